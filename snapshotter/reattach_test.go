package snapshotter

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestReattachHeldElsewhere: an image unmounted here but still mounted in
// another mount namespace is mounted again from the loop device that
// namespace holds, not from a second one. A namespace made while the image
// was mounted (a container's, a shim's) holds a copy of the mount, and
// with a private root (this machine's) unmounting here does not take the
// copy away: the filesystem stays alive on its loop device. A second loop
// device on the same file is a second ext4 on the same blocks, each with
// its own cache and journal; a CI run once read EBADMSG (a metadata
// checksum) from TestLimitCommitted's re-mounted image that way.
func TestReattachHeldElsewhere(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	if _, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bindSource(ctx, t, s, "limited"), "kept"), []byte("before"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := s.snapshotDir(s.idOf(ctx, t, "limited"))
	image := filepath.Join(dir, imageName)
	release := holdMount(t, dir)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
	if loops := loopsBacking(t, image); len(loops) != 1 {
		t.Fatalf("before the restart, loop devices on %s: %v; want the one the other namespace holds", image, loops)
	}

	ctx, s = openTest(t, root)
	if loops := loopsBacking(t, image); len(loops) != 1 {
		t.Fatalf("after the restart, loop devices on %s: %v; want the same one, mounted again", image, loops)
	}
	upper := bindSource(ctx, t, s, "limited")
	if b, err := os.ReadFile(filepath.Join(upper, "kept")); err != nil || string(b) != "before" {
		t.Fatalf("the file written before: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(upper, "after"), []byte("after"), 0o644); err != nil {
		t.Fatal(err)
	}
	if u, err := s.Usage(ctx, "limited"); err != nil || u.Inodes != 3 {
		t.Fatalf("Usage: %+v, %v; want the fs dir and two files", u, err)
	}
	release()
	if err := s.Remove(ctx, "limited"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	gone(t, dir)
	noImagesLeft(t, root)
}

// holdMount holds a copy of the mount on dir until the test ends, as a
// mount namespace made while it was mounted would: a detached clone
// (open_tree), which holds the one mount, where a namespace of its own
// would hold every mount there is, other tests' too.
func holdMount(t *testing.T, dir string) (release func()) {
	t.Helper()
	fd, err := unix.OpenTree(unix.AT_FDCWD, dir, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		t.Fatalf("clone the mount on %s: %v", dir, err)
	}
	var once sync.Once
	release = func() { once.Do(func() { unix.Close(fd) }) }
	t.Cleanup(release)
	return release
}

// loopsBacking lists the loop devices bound to the file path.
func loopsBacking(t *testing.T, path string) []string {
	t.Helper()
	files, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		t.Fatal(err)
	}
	var loops []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // cleared since the glob
		}
		if strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)") == path {
			loops = append(loops, strings.Split(f, "/")[3])
		}
	}
	return loops
}
