package snapshotter

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

// TestLostRenameRecreated: Prepare and View rename their directory into
// place after the metadata commits, with no fsync. A power cut that keeps
// the metadata and loses the renames (planted here as the cut leaves it:
// the daemon stopped, the directories gone, the unnamed new-* dirs left)
// is repaired at the next start: the container's upper comes back empty
// with its parent's root owner (and in userspace mode with the parent's
// files again), the view mounts, and nothing is reported missing.
func TestLostRenameRecreated(t *testing.T) {
	for _, mode := range []Mode{ModeOverlay, ModeUserspace} {
		t.Run(string(mode), func(t *testing.T) {
			root := t.TempDir()
			ctx, s := openTest(t, root, WithMode(mode))
			m, err := s.Prepare(ctx, "base-active", "")
			if err != nil {
				t.Fatal(err)
			}
			dir := m[0].Source
			if err := os.WriteFile(filepath.Join(dir, "motd"), []byte("hello\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(dir, 1234, 4321); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit(ctx, "base", "base-active"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Prepare(ctx, "container", "base"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.View(ctx, "view", "base"); err != nil {
				t.Fatal(err)
			}
			s.Close()
			// ids: 1 base, 2 container, 3 view.
			for _, id := range []string{"2", "3"} {
				if err := os.Rename(filepath.Join(root, "snapshots", id), filepath.Join(root, "snapshots", "new-"+id)); err != nil {
					t.Fatal(err)
				}
			}

			ctx, s = openTest(t, root, WithMode(mode))
			if m := s.Missing(); len(m) != 0 {
				t.Fatalf("missing after the restart: %v", m)
			}
			for _, id := range []string{"2", "3"} {
				if _, err := os.Stat(filepath.Join(root, "snapshots", "new-"+id)); !os.IsNotExist(err) {
					t.Errorf("the unnamed directory new-%s outlived the restart: %v", id, err)
				}
			}
			var st syscall.Stat_t
			if err := syscall.Stat(s.upperPath("2"), &st); err != nil {
				t.Fatal(err)
			}
			if st.Uid != 1234 || st.Gid != 4321 {
				t.Errorf("the upper made again is owned by %d:%d, want the parent's 1234:4321", st.Uid, st.Gid)
			}
			for _, key := range []string{"container", "view"} {
				mounts, err := s.Mounts(ctx, key)
				if err != nil {
					t.Fatal(err)
				}
				target := t.TempDir()
				if err := mount.All(mounts, target); err != nil {
					t.Fatalf("mount %s: %v", key, err)
				}
				got, err := os.ReadFile(filepath.Join(target, "motd"))
				mount.UnmountAll(target, 0)
				if err != nil || string(got) != "hello\n" {
					t.Errorf("%s shows motd %q, %v", key, got, err)
				}
			}
			if err := s.Commit(ctx, "layer", "container"); err != nil {
				t.Fatal(err)
			}
		})
	}
}
