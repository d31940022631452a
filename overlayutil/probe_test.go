package overlayutil

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// truth is what kernel 6.18 on this machine does for a privileged daemon,
// measured by hand before these tests were written; a different kernel may
// differ, and then the table, not the probe, is what to revisit.
type truth struct {
	ok     map[string]bool
	reason map[string]string // substring the Reason must hold
	value  map[string]string // substring the Value must hold
}

func hostTruth(reflink bool) truth {
	t := truth{
		ok: map[string]bool{
			CheckOverlay: true, CheckMultipleLowers: true, CheckIndexOff: true,
			CheckRedirectDir: true, CheckMetacopy: true, CheckVolatile: true,
			CheckUserXattrNeeded: false, CheckIDMapped: true, CheckLowerdirPlus: true,
			CheckMaxLowers: true, CheckReflink: reflink, CheckIntercepts: true,
		},
		reason: map[string]string{
			CheckUserXattrNeeded: "trusted.overlay.* xattrs are writable",
			CheckMaxLowers:       "too many lower directories, limit is 500",
		},
		value: map[string]string{
			CheckMaxLowers:   "500",
			CheckRedirectDir: "redirect=a",
			// The NOTES' measurement: every range op to another fs is EXDEV.
			CheckIntercepts: "cfr/overlay=new cfr/backing=EXDEV clone/backing=EXDEV read=new",
		},
	}
	if !reflink {
		t.reason[CheckReflink] = "operation not supported"
	}
	return t
}

func TestProbeTruth(t *testing.T) {
	for _, tc := range []struct {
		kind  loopfs.Kind
		truth truth
	}{
		{loopfs.Ext4, hostTruth(false)},
		{loopfs.XFS, hostTruth(true)},
		{loopfs.Btrfs, hostTruth(true)},
		// tmpfs takes an upper layer on 6.18: d_type, trusted and user
		// xattrs, RENAME_WHITEOUT and O_TMPFILE are all there.
		{loopfs.Tmpfs, hostTruth(false)},
	} {
		t.Run(string(tc.kind), func(t *testing.T) {
			root := filepath.Join(loopfs.Mount(t, tc.kind), "root")
			f := probeFresh(t, root)
			if f.BackingFS != string(tc.kind) {
				t.Errorf("BackingFS = %q, want %q", f.BackingFS, tc.kind)
			}
			assertTruth(t, f, tc.truth)
			if !f.CanServe() || !f.Intercepts() || f.MaxLowers() != 500 {
				t.Errorf("CanServe %t Intercepts %t MaxLowers %d, want true true 500", f.CanServe(), f.Intercepts(), f.MaxLowers())
			}
			if o := f.BaseOptions(); !o.IndexOff || o.UserXattr || !o.RedirectDir || o.MaxLowers != 500 {
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
		CheckMetacopy, CheckVolatile, CheckIDMapped, CheckLowerdirPlus, CheckMaxLowers, CheckReflink, CheckIntercepts} {
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
