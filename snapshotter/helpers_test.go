package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"

	"golang.org/x/sys/unix"
)

func mountOverlay(base, target string) error {
	opts := "lowerdir=" + filepath.Join(base, "lower") + ",upperdir=" + filepath.Join(base, "upper") + ",workdir=" + filepath.Join(base, "work")
	return unix.Mount("overlay", target, "overlay", 0, opts)
}

func unmount(target string) { unix.Unmount(target, unix.MNT_DETACH) }

// openTest opens a snapshotter on root for a test, closed when it ends.
// Its image pool keeps no covers unless opts has withCovers: filling them
// (up to a 128 GiB image) is time only the tests of the covers need.
func openTest(t *testing.T, root string, opts ...Opt) (context.Context, *Snapshotter) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "test")
	noCovers := func(c *Config) error { c.coverClasses = []int64{}; return nil }
	s, err := New(ctx, root, append([]Opt{noCovers}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return ctx, s
}

// withCovers has openTest's snapshotter keep covers of these classes in
// its image pool, or, given none, those a daemon keeps.
func withCovers(classes ...int64) Opt {
	return func(c *Config) error {
		c.coverClasses = classes
		return nil
	}
}

// openSideBySide opens overclone and containerd's built-in overlayfs
// snapshotter on roots of the same filesystem, to be measured together.
func openSideBySide(t *testing.T) (context.Context, *Snapshotter, snapshots.Snapshotter) {
	t.Helper()
	ctx, ours := openTest(t, t.TempDir())
	builtin, err := overlay.NewSnapshotter(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { builtin.Close() })
	return ctx, ours, builtin
}

// writePastLimit mounts m, the mounts of the active "limited" (testLimit,
// on committedBase's "base"), and checks that the image's file shows
// through, that writing past the limit stops with an error full accepts
// (want names it) between 80% and 100% of the limit, that Usage counts
// what was written, and that a new active "free" without a limit on the
// same root writes past that size. It returns where m is mounted, with
// the full file "big" still in it.
func writePastLimit(ctx context.Context, t *testing.T, s *Snapshotter, m []mount.Mount, full func(error) bool, want string) string {
	t.Helper()
	rootfs := mountAt(t, m)
	if b, err := os.ReadFile(filepath.Join(rootfs, "hello")); err != nil || string(b) != "from the image" {
		t.Fatalf("the image's file through the limited mount: %q, %v", b, err)
	}
	err := fillUp(filepath.Join(rootfs, "big"), 2*testLimit)
	if !full(err) {
		t.Fatalf("writing %d bytes into a %d-byte limit: %v, want %s", 2*testLimit, testLimit, err, want)
	}
	fi, _ := os.Stat(filepath.Join(rootfs, "big"))
	if fi.Size() < testLimit*8/10 || fi.Size() > testLimit {
		t.Fatalf("stopped at %d bytes of a %d-byte limit: want between 80%% and 100%%", fi.Size(), testLimit)
	}
	u, err := s.Usage(ctx, "limited")
	if err != nil {
		t.Fatal(err)
	}
	if u.Size < fi.Size() || u.Size > testLimit {
		t.Fatalf("Usage %d bytes of a full %d-byte limit holding a %d-byte file", u.Size, testLimit, fi.Size())
	}
	free, err := s.Prepare(ctx, "free", "base")
	if err != nil {
		t.Fatal(err)
	}
	if err := fillUp(filepath.Join(mountAt(t, free), "big"), testLimit+(8<<20)); err != nil {
		t.Fatalf("an unlimited container on the same root: %v", err)
	}
	return rootfs
}

// pollCPU is the CPU time of one poll of the Usage of the actives c0 to
// c<n-1> of sn.
func pollCPU(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, n int) time.Duration {
	t.Helper()
	return cpuOf(t, func() error {
		for i := range n {
			if _, err := sn.Usage(ctx, "c"+strconv.Itoa(i)); err != nil {
				return err
			}
		}
		return nil
	})
}

// coreShare is how much of one core d of CPU every 10 s is.
func coreShare(d time.Duration) string { return fmt.Sprintf("%.3f%%", 100*d.Seconds()/10) }

// activeWith prepares a parentless active key holding files (path:
// content) and returns its fs dir.
func activeWith(ctx context.Context, t *testing.T, s *Snapshotter, key string, files map[string][]byte) string {
	t.Helper()
	if _, err := s.Prepare(ctx, key, ""); err != nil {
		t.Fatal(err)
	}
	dir := bindSource(ctx, t, s, key)
	writeFiles(t, dir, files)
	return dir
}

// commitLayerUsage is commitLayer that also returns the active's usage
// just before the Commit, what a dedupe at Commit lowers.
func commitLayerUsage(ctx context.Context, t *testing.T, s *Snapshotter, name string, files map[string][]byte) (string, int64) {
	t.Helper()
	key := name + "-active"
	dir := activeWith(ctx, t, s, key, files)
	before := usageOf(ctx, t, s, key)
	if err := s.Commit(ctx, name, key); err != nil {
		t.Fatal(err)
	}
	return dir, before
}

// watchIdleDedupe has the idle dedupe worker report each layer it did on
// the channel returned, until the test ends.
func watchIdleDedupe(t *testing.T) <-chan DedupeResult {
	done := make(chan DedupeResult, 8)
	idleDedupeHook = func(r DedupeResult) { done <- r }
	t.Cleanup(func() { idleDedupeHook = nil })
	return done
}

// awaitIdleSmallFiles checks that the idle worker's next reports on done
// are of layers, in order, each with one file: the small file Commit
// left. when ends the failure messages.
func awaitIdleSmallFiles(t *testing.T, done <-chan DedupeResult, when string, layers ...string) {
	t.Helper()
	deadline := time.After(60 * time.Second) // a bound on failure, not a wait for success
	for _, want := range layers {
		select {
		case r := <-done:
			if r.Key != want || r.Files != 1 {
				t.Errorf("idle worker did %+v, want layer %s's one small file", r, want)
			}
		case <-deadline:
			t.Fatalf("the idle worker did not do layer %s%s", want, when)
		}
	}
}

// openSubvol opens dir, the root of a btrfs subvolume, and returns the
// descriptor, for the caller to close, and the subvolume's id.
func openSubvol(t *testing.T, dir string) (int, uint64) {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	id, err := btrfsSubvolID(fd)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	return fd, id
}
