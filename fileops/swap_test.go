package fileops

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// canaryState is what a write through a followed symlink would change.
type canaryState struct {
	mode, uid, gid uint32
	mtime, ctime   unix.Timespec
	xattrs         string
}

func readCanary(t *testing.T, p string) canaryState {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	n := readNode(t, p, nil)
	return canaryState{st.Mode, st.Uid, st.Gid, st.Mtim, st.Ctim, n.Xattrs}
}

// TestSwappedStagingName plays a container that writes the directory a
// copy creates entries in: once an entry is created, and before its
// owner, xattrs, mode and times are set, the name is moved away and a
// symlink to a file outside every layer put in its place. The outside
// file must not change, and the copy must either fail or leave no symlink
// where its entry belongs.
func TestSwappedStagingName(t *testing.T) {
	needRoot(t)
	for _, tc := range []struct {
		name string
		// run copies; base holds upper, lower and host; it returns the
		// path where the copy's entry belongs.
		run func(t *testing.T, s *Stack, base string) (string, error)
		// swaps reports the created name the container goes after.
		swaps func(name string) bool
	}{
		{"copy-in dir", func(t *testing.T, s *Stack, base string) (string, error) {
			_, err := s.CopyIn(context.Background(), filepath.Join(base, "host", "tree"), "payload")
			return filepath.Join(base, "upper", "payload"), err
		}, isStagingName},
		{"copy-in file", func(t *testing.T, s *Stack, base string) (string, error) {
			_, err := s.CopyIn(context.Background(), filepath.Join(base, "host", "file"), "payload")
			return filepath.Join(base, "upper", "payload"), err
		}, isStagingName},
		{"copy-in special", func(t *testing.T, s *Stack, base string) (string, error) {
			_, err := s.CopyIn(context.Background(), filepath.Join(base, "host", "fifo"), "payload")
			return filepath.Join(base, "upper", "payload"), err
		}, isStagingName},
		{"copy-in missing parent", func(t *testing.T, s *Stack, base string) (string, error) {
			_, err := s.CopyIn(context.Background(), filepath.Join(base, "host", "file"), "new/payload")
			return filepath.Join(base, "upper", "new"), err
		}, isStagingName},
		{"copy-up dir", func(t *testing.T, s *Stack, base string) (string, error) {
			_, err := s.CopyUp(context.Background(), "ldir")
			return filepath.Join(base, "upper", "ldir"), err
		}, isStagingName},
		{"copy-up file without O_TMPFILE", func(t *testing.T, s *Stack, base string) (string, error) {
			noTmpfile = true
			defer func() { noTmpfile = false }()
			_, err := s.CopyUp(context.Background(), "lfile")
			return filepath.Join(base, "upper", "lfile"), err
		}, isStagingName},
		{"copy-out dir", func(t *testing.T, s *Stack, base string) (string, error) {
			_, err := s.CopyOut(context.Background(), "ldir", filepath.Join(base, "host"))
			return filepath.Join(base, "host", "ldir"), err
		}, func(n string) bool { return n == "ldir" }},
		{"copy-out file", func(t *testing.T, s *Stack, base string) (string, error) {
			_, err := s.CopyOut(context.Background(), "lfile", filepath.Join(base, "host"))
			return filepath.Join(base, "host", "lfile"), err
		}, func(n string) bool { return n == "lfile" }},
		{"flatten", func(t *testing.T, s *Stack, base string) (string, error) {
			_, err := Flatten(context.Background(), s, filepath.Join(base, "flat"))
			return filepath.Join(base, "flat", "ldir"), err
		}, func(n string) bool { return n == "ldir" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			upper, lower, host := filepath.Join(base, "upper"), filepath.Join(base, "lower"), filepath.Join(base, "host")
			canary := filepath.Join(base, "outside", "canary")
			mustWrite(t, canary, []byte("secret"), 0o600)
			mustXattr(t, canary, "trusted.canary", "1")
			if err := os.Chown(canary, 4321, 4321); err != nil {
				t.Fatal(err)
			}
			past := []unix.Timespec{{Sec: 1000}, {Sec: 1000}}
			if err := unix.UtimesNano(canary, past); err != nil {
				t.Fatal(err)
			}
			// Sources: mode 0755, owner root, an xattr a symlink can
			// carry too (trusted.*), so that nothing stops the copy
			// before it would reach the mode.
			mustWrite(t, filepath.Join(host, "tree", "a"), []byte("a"), 0o755)
			mustWrite(t, filepath.Join(host, "file"), []byte("f"), 0o755)
			if err := unix.Mkfifo(filepath.Join(host, "fifo"), 0o755); err != nil {
				t.Fatal(err)
			}
			mustWrite(t, filepath.Join(lower, "ldir", "a"), []byte("a"), 0o755)
			mustWrite(t, filepath.Join(lower, "lfile"), []byte("f"), 0o755)
			for _, p := range []string{filepath.Join(host, "tree"), filepath.Join(host, "file"), filepath.Join(lower, "ldir"), filepath.Join(lower, "lfile")} {
				if err := os.Chmod(p, 0o755); err != nil {
					t.Fatal(err)
				}
				mustXattr(t, p, "trusted.src", "1")
			}
			mustMkdir(t, upper)
			before := readCanary(t, canary)

			swapped := false
			createdHook = func(dirfd int, name string) {
				if swapped || !tc.swaps(name) {
					return
				}
				swapped = true
				if err := unix.Renameat(dirfd, name, dirfd, name+"-moved"); err != nil {
					t.Errorf("move %s away: %v", name, err)
				}
				if err := unix.Symlinkat(canary, dirfd, name); err != nil {
					t.Errorf("symlink %s: %v", name, err)
				}
			}
			defer func() { createdHook = nil }()
			s, err := NewStack(upper, []string{lower})
			if err != nil {
				t.Fatal(err)
			}
			dst, err := tc.run(t, s, base)
			if !swapped {
				t.Fatalf("the hook never saw the entry (err %v)", err)
			}
			if after := readCanary(t, canary); after != before {
				t.Errorf("the outside file changed: %+v, was %+v", after, before)
			}
			if err == nil {
				if fi, lerr := os.Lstat(dst); lerr == nil && fi.Mode()&os.ModeSymlink != 0 {
					t.Errorf("the copy succeeded and left the swapped-in symlink at %s", dst)
				}
			}
			t.Logf("copy: %v", err)
		})
	}
}

// TestCopiedSymlinkKeepsMeta: the owner, xattrs and times of a symlink
// are set through its O_PATH handle (/proc/self/fd/N reaches the link
// itself); they must land on the link, not fail and not go through it.
func TestCopiedSymlinkKeepsMeta(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	upper, lower := filepath.Join(base, "upper"), filepath.Join(base, "lower")
	mustMkdir(t, upper)
	mustWrite(t, filepath.Join(lower, "target"), []byte("t"), 0o644)
	link := filepath.Join(lower, "link")
	if err := os.Symlink("target", link); err != nil {
		t.Fatal(err)
	}
	mustXattr(t, link, "trusted.link", "1")
	if err := os.Lchown(link, 123, 456); err != nil {
		t.Fatal(err)
	}
	if err := unix.Lutimes(link, []unix.Timeval{{Sec: 2000}, {Sec: 2000}}); err != nil {
		t.Fatal(err)
	}
	target := readNode(t, filepath.Join(lower, "target"), nil)
	want := readNode(t, link, nil)
	s, err := NewStack(upper, []string{lower})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CopyUp(context.Background(), "link"); err != nil {
		t.Fatal(err)
	}
	got := readNode(t, filepath.Join(upper, "link"), nil)
	if got.String() != want.String() || got.Mtime != want.Mtime {
		t.Errorf("copied link: %s %v, want %s %v", got, got.Mtime, want, want.Mtime)
	}
	if after := readNode(t, filepath.Join(lower, "target"), nil); after.String() != target.String() || after.Mtime != target.Mtime {
		t.Errorf("the link's target changed: %s, was %s", after, target)
	}
}
