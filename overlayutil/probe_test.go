package overlayutil

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// truth is what the running kernel does for a privileged daemon. It is
// not taken from the probe: the depth limit and lowerdir+ are measured
// here by mounting (kernelDepth), the rest comes from the release each
// feature entered the kernel (since), keyed by `uname -r`.
type truth struct {
	ok     map[string]bool
	reason map[string]string // substring the Reason must hold
	value  map[string]string // substring the Value must hold
}

// since is the kernel release each check's feature appeared in.
var since = map[string][2]int{
	CheckOverlay:        {3, 18},
	CheckMultipleLowers: {3, 19},
	CheckRedirectDir:    {4, 10},
	CheckIndexOff:       {4, 13},
	// 4.19 stacked overlay's file operations on the real file: from then
	// on a read or range copy through an fd opened before copy-up sees
	// the copied-up file; before, the stale lower one. Metacopy came with
	// it.
	CheckIntercepts: {4, 19},
	CheckMetacopy:   {4, 19},
	CheckVolatile:   {5, 10},
	// Overlay over idmapped layers; tmpfs itself takes idmapped mounts
	// only since 6.3.
	CheckIDMapped: {5, 19},
}

// crossFSCopyEXDEV: copy_file_range between filesystems fails with EXDEV
// again since 5.19 (5.3 to 5.18 copied).
var crossFSCopyEXDEV = [2]int{5, 19}

func kernelAtLeast(t *testing.T, v [2]int) bool {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var major, minor int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor); err != nil {
		t.Fatalf("kernel release %q: %v", u.Release[:], err)
	}
	return major > v[0] || major == v[0] && minor >= v[1]
}

// kernelDepth mounts n read-only lowers through the new mount API, one
// "lowerdir+" per fsconfig call (no page limit), for growing n: the
// deepest stack that mounts, and whether lowerdir+ exists at all (6.8+;
// without it the depth is the kernel's OVL_MAX_STACK, 500 since 3.18).
func kernelDepth(t *testing.T, dir string) (depth int, lowerdirPlus bool) {
	t.Helper()
	const most = 1024
	lowers := make([]string, most)
	for i := range lowers {
		lowers[i] = filepath.Join(dir, strconv.Itoa(i))
		if err := os.Mkdir(lowers[i], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mounts := func(n int) (bool, error) {
		fd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
		if err != nil {
			return false, err
		}
		defer unix.Close(fd)
		for _, l := range lowers[:n] {
			if err := unix.FsconfigSetString(fd, "lowerdir+", l); err != nil {
				return false, err
			}
		}
		if err := unix.FsconfigCreate(fd); err != nil {
			return false, nil
		}
		mfd, err := unix.Fsmount(fd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_RDONLY)
		if err != nil {
			return false, nil
		}
		unix.Close(mfd) // never attached: closing it unmounts
		return true, nil
	}
	ok, err := mounts(2)
	if err != nil || !ok {
		t.Logf("two lowers through lowerdir+ do not mount (%v): the depth is OVL_MAX_STACK", err)
		return DefaultMaxLowers, false
	}
	lo, hi := 2, most+1 // lo mounts, hi does not
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		// Past the limit the kernel may refuse the lowerdir+ itself.
		if ok, _ := mounts(mid); ok {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo, true
}

func kernelTruth(t *testing.T, kind loopfs.Kind, depth int, lowerdirPlus bool) truth {
	tr := truth{
		ok: map[string]bool{
			CheckUserXattrNeeded: false, CheckLowerdirPlus: lowerdirPlus,
			CheckMaxLowers: true, CheckReflink: kind.Reflinks(), CheckDedupe: kind.Reflinks(),
		},
		reason: map[string]string{
			CheckUserXattrNeeded: "trusted.overlay.* xattrs are writable",
			CheckMaxLowers:       fmt.Sprintf("%d lowers refused", depth+1),
		},
		value: map[string]string{
			CheckMaxLowers:   strconv.Itoa(depth),
			CheckRedirectDir: "redirect=a",
		},
	}
	for name, v := range since {
		tr.ok[name] = kernelAtLeast(t, v)
	}
	if kind == loopfs.Tmpfs {
		tr.ok[CheckIDMapped] = kernelAtLeast(t, [2]int{6, 3})
	}
	if !kind.Reflinks() {
		tr.reason[CheckReflink] = "operation not supported"
		tr.reason[CheckDedupe] = "operation not supported"
	}
	if tr.ok[CheckIntercepts] {
		// A clone never crosses filesystems; within the overlay the
		// copy and the read see the copied-up file.
		v := "cfr/overlay=new clone/backing=EXDEV read=new"
		if kernelAtLeast(t, crossFSCopyEXDEV) {
			v += " cfr/backing=EXDEV"
		}
		tr.value[CheckIntercepts] = v
	}
	return tr
}

func TestProbeTruth(t *testing.T) {
	depth, lowerdirPlus := kernelDepth(t, loopfs.Mount(t, loopfs.Tmpfs))
	t.Logf("this kernel mounts %d lowers (lowerdir+: %t)", depth, lowerdirPlus)
	// tmpfs takes an upper layer: d_type, trusted and user xattrs,
	// RENAME_WHITEOUT and O_TMPFILE are all there.
	for _, kind := range []loopfs.Kind{loopfs.Ext4, loopfs.XFS, loopfs.Btrfs, loopfs.Tmpfs} {
		t.Run(string(kind), func(t *testing.T) {
			root := filepath.Join(loopfs.Mount(t, kind), "root")
			f := probeFresh(t, root)
			if f.BackingFS != string(kind) {
				t.Errorf("BackingFS = %q, want %q", f.BackingFS, kind)
			}
			want := kernelTruth(t, kind, depth, lowerdirPlus)
			assertTruth(t, f, want)
			if !f.CanServe() || f.Intercepts() != want.ok[CheckIntercepts] || f.MaxLowers() != depth {
				t.Errorf("CanServe %t Intercepts %t MaxLowers %d, want true %t %d", f.CanServe(), f.Intercepts(), f.MaxLowers(), want.ok[CheckIntercepts], depth)
			}
			if o := f.BaseOptions(); !o.IndexOff || o.UserXattr || !o.RedirectDir || o.MaxLowers != depth {
				t.Errorf("BaseOptions = %+v", o)
			}
		})
	}
}

// TestProbeOnOverlay puts the root inside an overlay mount, as when the
// daemon runs in a container without a volume for its root: the kernel
// refuses an overlay as upper layer, and every probe that needs a mount
// says so.
func TestProbeOnOverlay(t *testing.T) {
	base := loopfs.Mount(t, loopfs.Ext4)
	for _, d := range []string{"l", "u", "w", "m"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m := filepath.Join(base, "m")
	opts := "lowerdir=" + filepath.Join(base, "l") + ",upperdir=" + filepath.Join(base, "u") + ",workdir=" + filepath.Join(base, "w")
	if err := unix.Mount("overlay", m, "overlay", 0, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(m, unix.MNT_DETACH) })

	f := probeFresh(t, filepath.Join(m, "root"))
	if f.BackingFS != "overlay" {
		t.Errorf("BackingFS = %q", f.BackingFS)
	}
	ok := map[string]bool{CheckUserXattrNeeded: false}
	reason := map[string]string{
		CheckOverlay:  "is itself on overlayfs",
		CheckReflink:  "operation not supported",
		CheckMetacopy: "see check overlay",
	}
	for _, name := range []string{CheckOverlay, CheckMultipleLowers, CheckIndexOff, CheckRedirectDir,
		CheckMetacopy, CheckVolatile, CheckIDMapped, CheckLowerdirPlus, CheckMaxLowers, CheckReflink, CheckDedupe, CheckIntercepts} {
		ok[name] = false
	}
	// The kernel's own words, replayed through fsconfig.
	reason[CheckOverlay] = "not supported as upperdir"
	assertTruth(t, f, truth{ok: ok, reason: reason})
	if f.CanServe() || f.MaxLowers() != 0 {
		t.Errorf("CanServe %t MaxLowers %d on overlayfs", f.CanServe(), f.MaxLowers())
	}
}

func TestProbeCaches(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.Tmpfs), "root")
	ctx := context.Background()
	Forget(root)
	a, err := Probe(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Probe(ctx, root+"/")
	if err != nil {
		t.Fatal(err)
	}
	if a != b {
		t.Error("second Probe of the same root probed again")
	}
	Forget(root)
	c, err := Probe(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	if c == a {
		t.Error("Probe after Forget returned the cached features")
	}
	Forget(root)
}

// probeFresh probes root without the cache and checks the probe left
// nothing behind: no scratch dir, no mount.
func probeFresh(t *testing.T, root string) *Features {
	t.Helper()
	Forget(root)
	t.Cleanup(func() { Forget(root) })
	f, err := Probe(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range f.Checks {
		t.Logf("%-20s %-5t value=%q reason=%q", c.Name, c.OK, c.Value, c.Reason)
	}
	ents, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("probe left %s in the root", e.Name())
	}
	left, err := mountsBelow(root)
	if err != nil || len(left) > 0 {
		t.Errorf("probe left mounts %v (%v)", left, err)
	}
	return f
}

func assertTruth(t *testing.T, f *Features, want truth) {
	t.Helper()
	if len(f.Checks) != len(want.ok) {
		t.Errorf("%d checks, want %d", len(f.Checks), len(want.ok))
	}
	for name, ok := range want.ok {
		c := f.Get(name)
		if c.OK != ok {
			t.Errorf("%s: ok=%t, want %t (value %q, reason %q)", name, c.OK, ok, c.Value, c.Reason)
		}
		if !c.OK && c.Reason == "" {
			t.Errorf("%s: false without a reason", name)
		}
		if s := want.reason[name]; s != "" && !strings.Contains(c.Reason, s) {
			t.Errorf("%s: reason %q does not say %q", name, c.Reason, s)
		}
		if s := want.value[name]; s != "" && !containsAll(c.Value, strings.Fields(s)) {
			t.Errorf("%s: value %q does not hold %q", name, c.Value, s)
		}
	}
	if want.ok[CheckMaxLowers] && strconv.Itoa(f.MaxLowers()) != f.Get(CheckMaxLowers).Value {
		t.Errorf("MaxLowers() %d disagrees with the check's value %q", f.MaxLowers(), f.Get(CheckMaxLowers).Value)
	}
}

func containsAll(s string, parts []string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}
