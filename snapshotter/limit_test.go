package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	cfs "github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// testLimit is small, so that filling it is quick, and above MinMaxSize.
const testLimit = 48 << 20

func withMaxSize(size int64) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{LabelMaxSize: strconv.FormatInt(size, 10)})
}

// needLimits skips (fails under OVERCLONE_STRICT) where this machine
// cannot make loop-mounted images.
func needLimits(t *testing.T) {
	t.Helper()
	require.Root(t, "size limits mount loop devices")
	if m := ProbeLimits(ModeOverlay); !m.OK {
		require.Skipf(t, "size limits unavailable: %s", m.How)
	}
}

// limitRoot is a new root whose images are unmounted when the test ends
// (after the snapshotter closes, which keeps them, as SIGTERM does).
func limitRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	t.Cleanup(func() {
		if t.Failed() {
			// An image's filesystem said EBADMSG once (a metadata
			// checksum) in a full CI run and never alone: what the
			// kernel logged is the lead to follow.
			out, _ := exec.Command("sh", "-c", "dmesg | grep -E 'EXT4-fs|loop' | tail -40").CombinedOutput()
			t.Logf("kernel log:\n%s", out)
		}
		dirs, _ := filepath.Glob(filepath.Join(root, snapshotsDir, "*"))
		for _, d := range dirs {
			syscall.Unmount(d, syscall.MNT_DETACH)
		}
	})
	return root
}

// mountAt mounts mounts on a new directory, unmounted when the test ends.
func mountAt(t *testing.T, mounts []mount.Mount) string {
	t.Helper()
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatalf("mount %+v: %v", mounts, err)
	}
	t.Cleanup(func() { mount.UnmountAll(target, 0) })
	return target
}

// fillUp writes to path until the filesystem refuses, up to exactly max
// bytes, syncs it, and returns the error that stopped it (nil if max fit).
func fillUp(path string, max int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i) // not zeros: nothing may compress or skip them
	}
	for n := int64(0); n < max; n += int64(len(buf)) {
		if _, err := f.Write(buf[:min(max-n, int64(len(buf)))]); err != nil {
			return err
		}
	}
	return f.Sync()
}

func isFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// committedBase makes a committed layer "base" holding one file.
func committedBase(ctx context.Context, t *testing.T, s *Snapshotter) {
	t.Helper()
	if _, err := s.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bindSource(ctx, t, s, "base-active"), "hello"), []byte("from the image"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
}

// TestLimitWritePastFails, on roots of ext4, xfs and btrfs: a container
// writing through a real overlay mount of an active snapshot labelled
// max-size gets ENOSPC (or EDQUOT) near the limit, not before 80% of it,
// still sees its image's files, and another container on the same root
// without a limit writes past that size.
func TestLimitWritePastFails(t *testing.T) {
	needLimits(t)
	for _, k := range []loopfs.Kind{loopfs.Ext4, loopfs.XFS, loopfs.Btrfs} {
		t.Run(string(k), func(t *testing.T) {
			ctx, s := openTest(t, filepath.Join(loopfs.Mount(t, k), "root"), WithMode(ModeOverlay))
			committedBase(ctx, t, s)
			limited, err := s.Prepare(ctx, "limited", "base", withMaxSize(testLimit))
			if err != nil {
				t.Fatal(err)
			}
			if limited[0].Type != "overlay" {
				t.Fatalf("limited snapshot mounts as %+v, want an overlay", limited)
			}
			writePastLimit(ctx, t, s, limited, isFull, "ENOSPC or EDQUOT")
		})
	}
}

// TestLimitUsageMatchesWalk: the Usage of a limited active, from its
// image's counters, agrees with a walk of its upper (continuity's
// DiskUsage, what the built-in answers): inodes exactly, bytes within a
// block per inode, through writes, hard links, symlinks, a deletion of a
// lower file (a whiteout) and a directory tree.
func TestLimitUsageMatchesWalk(t *testing.T) {
	needLimits(t)
	usageMatchesWalk(t, limitRoot(t), false)
}

// usageMatchesWalk checks Usage against a walk on an active limited to
// 256 MiB, made in its Prepare, or taken from the pool's 1 GiB cover
// (pooled: held to it by its reserve).
func usageMatchesWalk(t *testing.T, root string, pooled bool) {
	opts := []Opt{WithMode(ModeOverlay)}
	if pooled {
		opts = append(opts, withCovers(1<<30))
	}
	ctx, s := openTest(t, root, opts...)
	committedBase(ctx, t, s)
	if pooled {
		if _, err := s.Prepare(ctx, "seed", "base", withMaxSize(1<<30)); err != nil {
			t.Fatal(err)
		}
		s.pool.wait()
	}
	m, err := s.Prepare(ctx, "limited", "base", withMaxSize(256<<20))
	if err != nil {
		t.Fatal(err)
	}
	if s.quotas != nil {
		recountNow(s)
	}
	if fromPool(ctx, t, s, "limited") != pooled {
		t.Fatalf("the image is from the pool: %v, want %v", !pooled, pooled)
	}
	check := func(when string) {
		t.Helper()
		var u snapshots.Usage
		if s.quotas != nil { // inodes: once the recount is done
			u = settledUsage(ctx, t, s, "limited")
		} else {
			var err error
			if u, err = s.Usage(ctx, "limited"); err != nil {
				t.Fatal(err)
			}
		}
		walk, err := cfs.DiskUsage(ctx, s.upperPath(s.idOf(ctx, t, "limited")))
		if err != nil {
			t.Fatal(err)
		}
		if u.Inodes != walk.Inodes {
			t.Errorf("%s: Usage says %d inodes, a walk %d", when, u.Inodes, walk.Inodes)
		}
		if d := u.Size - walk.Size; d < -4096*walk.Inodes || d > 4096*walk.Inodes {
			t.Errorf("%s: Usage says %d bytes, a walk %d: off by more than a block per inode", when, u.Size, walk.Size)
		}
		t.Logf("%s: usage %+v, walk %+v", when, u, walk)
	}
	check("empty")
	rootfs := mountAt(t, m)
	for d := range 5 {
		dir := filepath.Join(rootfs, "d"+strconv.Itoa(d), "sub")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for f := range 60 {
			if err := os.WriteFile(filepath.Join(dir, strconv.Itoa(f)), make([]byte, f*1000), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.WriteFile(filepath.Join(rootfs, "big"), make([]byte, 3<<20+5), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(rootfs, "big"), filepath.Join(rootfs, "big-link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("big", filepath.Join(rootfs, "sym")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(rootfs, "hello")); err != nil { // a whiteout in the upper
		t.Fatal(err)
	}
	syscall.Sync()
	check("written")
	if err := os.RemoveAll(filepath.Join(rootfs, "d3")); err != nil {
		t.Fatal(err)
	}
	syscall.Sync()
	check("after a removal")
}

// idOf is the id of key, for tests that look at its directory.
func (s *Snapshotter) idOf(ctx context.Context, t *testing.T, key string) string {
	t.Helper()
	var id string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

// TestLimitLabels: what a label asks is honoured or refused with its
// class, never ignored.
func TestLimitLabels(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(64<<20))
	committedBase(ctx, t, s)
	for _, bad := range []string{"abc", "-1", "1000", "100MB", ""} {
		_, err := s.Prepare(ctx, "bad-"+bad, "base", snapshots.WithLabels(map[string]string{LabelMaxSize: bad}))
		if !errdefs.IsInvalidArgument(err) {
			t.Errorf("max-size %q: %v, want InvalidArgument", bad, err)
		}
	}
	mounted := func(key string) bool {
		ok, err := isMountPoint(s.snapshotDir(s.idOf(ctx, t, key)))
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	// The default: a container gets it, recorded as a label; a layer
	// being unpacked does not; "0" asks for none; a view needs none.
	if _, err := s.Prepare(ctx, "container", "base"); err != nil {
		t.Fatal(err)
	}
	if info, _ := s.Stat(ctx, "container"); info.Labels[LabelMaxSize] != strconv.Itoa(64<<20) || !mounted("container") {
		t.Errorf("a container's active without a label: labels %v, image mounted %v; want the default", info.Labels, mounted("container"))
	}
	if _, err := s.Prepare(ctx, "unpack", "base", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: "sha256:x"})); err != nil {
		t.Fatal(err)
	}
	if mounted("unpack") {
		t.Error("a layer being unpacked got the default limit")
	}
	if _, err := s.Prepare(ctx, "unlimited", "base", withMaxSize(0)); err != nil {
		t.Fatal(err)
	}
	if mounted("unlimited") {
		t.Error(`max-size "0" still got the default limit`)
	}
	if _, err := s.View(ctx, "view", "base", withMaxSize(64<<20)); err != nil {
		t.Errorf("a view with max-size: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Userspace mode refuses, saying why.
	ctx, us := openTest(t, t.TempDir(), WithMode(ModeUserspace))
	_, err := us.Prepare(ctx, "limited", "", withMaxSize(64<<20))
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "userspace") {
		t.Errorf("max-size in userspace mode: %v, want FailedPrecondition naming userspace mode", err)
	}
	if _, err := New(ctx, t.TempDir(), WithMode(ModeUserspace), WithDefaultMaxSize(64<<20)); err == nil {
		t.Error("default_max_size in userspace mode started")
	}
}

// imagesLeft lists what size limits hold under root: mounts, and loop
// devices whose backing file is under it.
func imagesLeft(t *testing.T, root string) []string {
	t.Helper()
	var left []string
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], root+"/") {
			left = append(left, "mount "+f[4])
		}
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, l := range loops {
		if b, err := os.ReadFile(l); err == nil && strings.HasPrefix(string(b), root+"/") {
			left = append(left, fmt.Sprintf("%s -> %s", filepath.Dir(filepath.Dir(l)), strings.TrimSpace(string(b))))
		}
	}
	return left
}

// noImagesLeft fails if anything of a size limit is left under root. The
// kernel clears an autoclear loop device in a worker after its last user
// lets go (since 5.17), so the devices get a bounded wait: 10 s is far
// past that, and a leaked one never goes.
func noImagesLeft(t *testing.T, root string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := imagesLeft(t, root)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) || strings.HasPrefix(left[0], "mount ") {
			t.Fatalf("left behind under %s: %v", root, left)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestLimitRestart: a limited snapshot keeps its limit and its files
// across a daemon restart (its image still mounted) and across a reboot
// (nothing mounted: start-up mounts it again); Remove unmounts it and
// deletes its image, and nothing is left behind.
func TestLimitRestart(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	committedBase(ctx, t, s)
	m, err := s.Prepare(ctx, "limited", "base", withMaxSize(testLimit))
	if err != nil {
		t.Fatal(err)
	}
	rootfs := mountAt(t, m)
	if err := os.WriteFile(filepath.Join(rootfs, "kept"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := mount.UnmountAll(rootfs, 0); err != nil {
		t.Fatal(err)
	}
	before, err := s.Usage(ctx, "limited")
	if err != nil {
		t.Fatal(err)
	}
	dir := s.snapshotDir(s.idOf(ctx, t, "limited"))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	reopenAndCheck := func(when string) {
		t.Helper()
		ctx, s = openTest(t, root)
		if ok, err := isMountPoint(dir); err != nil || !ok {
			t.Fatalf("%s: image not mounted on %s: %v", when, dir, err)
		}
		m, err := s.Mounts(ctx, "limited")
		if err != nil {
			t.Fatal(err)
		}
		rootfs := mountAt(t, m)
		if fi, err := os.Stat(filepath.Join(rootfs, "kept")); err != nil || fi.Size() != 1<<20 {
			t.Fatalf("%s: the file written before: %v", when, err)
		}
		if err := fillUp(filepath.Join(rootfs, "big"), 2*testLimit); !isFull(err) {
			t.Fatalf("%s: the limit no longer holds: %v", when, err)
		}
		os.Remove(filepath.Join(rootfs, "big"))
		if err := mount.UnmountAll(rootfs, 0); err != nil {
			t.Fatal(err)
		}
		if u, err := s.Usage(ctx, "limited"); err != nil || u.Inodes != before.Inodes {
			t.Fatalf("%s: Usage %+v, %v; before it was %+v", when, u, err, before)
		}
	}
	reopenAndCheck("after a restart")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// A reboot: every mount is gone.
	if err := syscall.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
	reopenAndCheck("after a reboot")

	if err := s.Remove(ctx, "limited"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // waits for the trash
		t.Fatal(err)
	}
	gone(t, dir)
	noImagesLeft(t, root)
}

// TestLimitCrashAfterRemove: a crash between Remove's transaction and its
// unmount leaves a mounted image no metadata names; Cleanup (while
// running) and the next start (after a crash) unmount it and delete it.
func TestLimitCrashAfterRemove(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	committedBase(ctx, t, s)
	var dirs []string
	for _, key := range []string{"gc", "crash"} {
		if _, err := s.Prepare(ctx, key, "base", withMaxSize(testLimit)); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, s.snapshotDir(s.idOf(ctx, t, key)))
		// What Remove's transaction does, and nothing after it.
		if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, key)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if key == "gc" {
			if err := s.Cleanup(ctx); err != nil {
				t.Fatalf("Cleanup with a removed snapshot's image mounted: %v", err)
			}
			if ok, _ := isMountPoint(dirs[0]); ok {
				t.Fatal("Cleanup left a removed snapshot's image mounted")
			}
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, s = openTest(t, root)
	if err := s.Close(); err != nil { // waits for the trash
		t.Fatal(err)
	}
	gone(t, dirs...)
	noImagesLeft(t, root)
}

// TestLimitTemplates: the images the pool keeps of a class are copies of
// one template per class, made by the refill (no template per limit);
// past maxTemplates, the pool formats each image it keeps and the limit
// holds the same; a half-made template left by a crash, and a template of
// an older version, go at the next start.
func TestLimitTemplates(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	for i, size := range []int64{40 << 20, 100 << 20, 300 << 20} {
		if _, err := s.Prepare(ctx, "c"+strconv.Itoa(i), "", withMaxSize(size)); err != nil {
			t.Fatal(err)
		}
		s.pool.wait()
		there(t, s.templates.path(sizeClass(size)))
		gone(t, s.templates.path(size))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Templates of other classes up to the bound.
	for i := range maxTemplates - 3 {
		if err := os.WriteFile(filepath.Join(root, templatesDir, "ext4-"+templateVersion+"-"+strconv.Itoa(1<<(40+i))), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ctx, s = openTest(t, root)
	for _, key := range []string{"cold", "pooled"} {
		if _, err := s.Prepare(ctx, key, "", withMaxSize(MinMaxSize)); err != nil {
			t.Fatal(err)
		}
		s.pool.wait()
	}
	gone(t, s.templates.path(MinMaxSize))
	if !fromPool(ctx, t, s, "pooled") {
		t.Fatal("past maxTemplates, the pool keeps no images")
	}
	if err := fillUp(filepath.Join(bindSource(ctx, t, s, "pooled"), "big"), 2*MinMaxSize); !isFull(err) {
		t.Fatalf("past %d templates, the limit: %v", maxTemplates, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	half := filepath.Join(root, templatesDir, "ext4-"+templateVersion+"-1.new-123")
	older := filepath.Join(root, templatesDir, "ext4-v1-"+strconv.Itoa(testLimit)) // laid out no dirs
	for _, p := range []string{half, older} {
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	openTest(t, root)
	gone(t, half)
	gone(t, older)
}

// closedLimited prepares "limited" with testLimit on a new snapshotter on
// root, closes it, and returns the snapshot's directory.
func closedLimited(t *testing.T, root string) string {
	t.Helper()
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	if _, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	dir := s.snapshotDir(s.idOf(ctx, t, "limited"))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestLimitLostRename: a power cut that lost a limited snapshot's rename
// (its directory, with the image in it, is gone; the metadata names it)
// gets the directory made again at start with a new image, so the limit
// still holds, rather than an unlimited upper.
func TestLimitLostRename(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	dir := closedLimited(t, root)
	if err := syscall.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	ctx, s := openTest(t, root)
	if ok, err := isMountPoint(dir); err != nil || !ok {
		t.Fatalf("the lost directory was not made again with its image: mounted %v, %v", ok, err)
	}
	if err := fillUp(filepath.Join(bindSource(ctx, t, s, "limited"), "big"), 2*testLimit); !isFull(err) {
		t.Fatalf("after the lost rename, the limit: %v", err)
	}
}

// TestLimitPool: with default_max_size, Prepares take images kept ready
// (one after another, faster than the pool refills too), each holds the
// limit and counts from zero; Close lets go of the ready ones (no mount,
// no loop device, no file left), and pooled files a killed daemon left
// go at the next start.
func TestLimitPool(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(testLimit))
	for i := range poolSize + 2 {
		k := "c" + strconv.Itoa(i)
		if _, err := s.Prepare(ctx, k, ""); err != nil {
			t.Fatal(err)
		}
		if u, err := s.Usage(ctx, k); err != nil || u.Inodes != 1 {
			t.Fatalf("a new limited snapshot's Usage: %+v, %v; want its fs dir alone", u, err)
		}
	}
	if err := fillUp(filepath.Join(bindSource(ctx, t, s, "c0"), "big"), 2*testLimit); !isFull(err) {
		t.Fatalf("a pooled image's limit: %v", err)
	}
	for i := range poolSize + 2 {
		if err := s.Remove(ctx, "c"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	noImagesLeft(t, root)
	if pooled, _ := filepath.Glob(filepath.Join(root, templatesDir, "pool-*")); len(pooled) != 0 {
		t.Fatalf("pooled images left after Close: %v", pooled)
	}

	left := filepath.Join(root, templatesDir, "pool-left-by-a-kill")
	if err := os.WriteFile(left, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	openTest(t, root)
	gone(t, left)
}

// TestLimitPoolSizes: a limit's class is pooled once asked for, so the
// next Prepares it serves take ready images
// (the pool, refilled, shrinks by one per Prepare); at most poolSizes
// limits are pooled, the default's always, and one pushed out lets go of
// its images (no file, no loop device left); Close lets go of the rest.
func TestLimitPoolSizes(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(testLimit))
	prepare := func(key string, size int64) {
		t.Helper()
		if _, err := s.Prepare(ctx, key, "", withMaxSize(size)); err != nil {
			t.Fatal(err)
		}
	}
	const labelled, class = 100 << 20, 128 << 20
	if n := s.pool.readyOf(class); n != -1 {
		t.Fatalf("a limit nobody asked for is pooled (%d ready)", n)
	}
	prepare("first", labelled) // makes its own image, and asks for more
	s.pool.wait()
	if n := s.pool.readyOf(class); n != poolSize {
		t.Fatalf("after the first Prepare of a limit, %d of its class ready; want %d", n, poolSize)
	}
	// Taken with no refill in between (a larger limit of the class):
	// the count shows it came from the pool.
	resume := holdRefills(&s.pool)
	prepare("second", 120<<20)
	if n := s.pool.readyOf(class); n != poolSize-1 {
		t.Fatalf("a Prepare the pooled limit serves left %d ready; want %d", n, poolSize-1)
	}
	resume()
	if err := fillUp(filepath.Join(bindSource(ctx, t, s, "second"), "big"), 2*labelled); !isFull(err) {
		t.Fatalf("a pooled image's limit: %v", err)
	}
	if u, err := s.Usage(ctx, "second"); err != nil || u.Size < 90<<20 || u.Size > 120<<20 {
		t.Fatalf("the filled pooled image's Usage: %+v, %v; want most of its 120 MiB", u, err)
	}

	// poolSizes-1 more limits push the labelled ones out (the default's
	// stays): 300 MiB, 600 MiB and 1.5 GiB.
	for i, size := range []int64{300 << 20, 600 << 20, 1536 << 20} {
		prepare("other"+strconv.Itoa(i), size)
		s.pool.wait()
	}
	if n := s.pool.readyOf(class); n != -1 {
		t.Fatalf("the least recently asked for limit still pooled (%d ready)", n)
	}
	if n := s.pool.readyOf(sizeClass(testLimit)); n != poolSize {
		t.Fatalf("the default's class has %d ready; want %d", n, poolSize)
	}
	pooled, _ := filepath.Glob(filepath.Join(root, templatesDir, "pool-*"))
	if len(pooled) != poolSizes*poolSize {
		t.Fatalf("%d pooled images on disk; want %d: %v", len(pooled), poolSizes*poolSize, pooled)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if pooled, _ := filepath.Glob(filepath.Join(root, templatesDir, "pool-*")); len(pooled) != 0 {
		t.Fatalf("pooled images left after Close: %v", pooled)
	}
	// What is left is the snapshots' own images, mounted on their dirs;
	// no loop device of a pooled image.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var fromPool []string
		for _, l := range imagesLeft(t, root) {
			if strings.Contains(l, "/pool-") {
				fromPool = append(fromPool, l)
			}
		}
		if len(fromPool) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("loop devices of pooled images left: %v", fromPool)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestLimitCommitted: a limited active committed (a container committed
// as an image layer) keeps its files in its image, which containerd's
// Commit no longer labels: the layer still serves after a reboot (its
// image mounted again at start), and its Remove takes the image down;
// both for an image made at its limit and one from the pool.
func TestLimitCommitted(t *testing.T) {
	needLimits(t)
	t.Run("made at its limit", func(t *testing.T) { limitCommitted(t, false) })
	t.Run("from the pool", func(t *testing.T) { limitCommitted(t, true) })
}

// limitCommitted is TestLimitCommitted on an image made in its Prepare, or
// taken from the pool.
func limitCommitted(t *testing.T, pooled bool) {
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(testLimit))
	opts := []snapshots.Opt{withMaxSize(100 << 20)} // the default's class does not serve it
	if pooled {
		s.pool.wait()
		opts = nil // the default's, pooled
	}
	if _, err := s.Prepare(ctx, "limited", "", opts...); err != nil {
		t.Fatal(err)
	}
	if fromPool(ctx, t, s, "limited") != pooled {
		t.Fatalf("the image is from the pool: %v, want %v", !pooled, pooled)
	}
	if err := os.WriteFile(filepath.Join(bindSource(ctx, t, s, "limited"), "kept"), []byte("in the image"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "layer", "limited"); err != nil {
		t.Fatal(err)
	}
	if u, err := s.Usage(ctx, "layer"); err != nil || u.Inodes != 2 {
		t.Fatalf("the committed layer's Usage: %+v, %v; want its fs dir and its file", u, err)
	}
	dir := s.snapshotDir(s.idOf(ctx, t, "layer"))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Unmount(dir, 0); err != nil { // a reboot
		t.Fatal(err)
	}
	ctx, s = openTest(t, root)
	if _, err := s.View(ctx, "view", "layer"); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(bindSource(ctx, t, s, "view"), "kept")); err != nil || string(b) != "in the image" {
		t.Fatalf("the committed layer after a reboot: %q, %v", b, err)
	}
	for _, key := range []string{"view", "layer"} {
		if err := s.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	gone(t, dir)
	noImagesLeft(t, root)
}
