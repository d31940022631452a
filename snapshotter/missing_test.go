package snapshotter

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/test/require"
)

// TestMissingDirectoryRefused: a committed layer whose directory vanished
// while the daemon was down is reported at start and never handed out
// again: Prepare or View on it as a parent and Mounts of a child fail with
// FailedPrecondition and a message that says what to do; the rest of the
// root keeps working, and removing the broken snapshot clears it. An active
// snapshot's directory holds nothing its metadata does not describe until
// something is written in it, so a missing one is made again.
func TestMissingDirectoryRefused(t *testing.T) {
	for _, mode := range []Mode{ModeOverlay, ModeUserspace} {
		t.Run(string(mode), func(t *testing.T) { testMissingDirectoryRefused(t, mode) })
	}
}

func testMissingDirectoryRefused(t *testing.T, mode Mode) {
	root := t.TempDir()
	ctx, s := openTest(t, root, WithMode(mode))
	for _, step := range []func() error{
		func() error { _, err := s.Prepare(ctx, "lost-active", ""); return err },
		func() error { return s.Commit(ctx, "lost", "lost-active") },
		func() error { _, err := s.Prepare(ctx, "kept-active", ""); return err },
		func() error { return s.Commit(ctx, "kept", "kept-active") },
		func() error { _, err := s.Prepare(ctx, "container", "lost"); return err },
		func() error { _, err := s.Prepare(ctx, "gone-active", ""); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	// An operator's rm, or fsck, took layer 1 (the "lost" layer) and
	// the directory of the active "gone-active" (id 4).
	for _, id := range []string{"1", "4"} {
		if err := os.RemoveAll(filepath.Join(root, "snapshots", id)); err != nil {
			t.Fatal(err)
		}
	}

	s, err := New(ctx, root, WithMode(mode))
	if err != nil {
		t.Fatalf("start with a missing layer must succeed: %v", err)
	}
	defer s.Close()
	if m := s.Missing(); len(m) != 1 || m["1"] != "lost" {
		t.Fatalf("missing after start: %v", m)
	}
	if err := s.Commit(ctx, "gone", "gone-active"); err != nil {
		t.Fatalf("the active made again does not commit: %v", err)
	}
	for name, call := range map[string]func() error{
		"prepare on it":     func() error { _, err := s.Prepare(ctx, "new", "lost"); return err },
		"view of it":        func() error { _, err := s.View(ctx, "v", "lost"); return err },
		"mounts of a child": func() error { _, err := s.Mounts(ctx, "container"); return err },
	} {
		err := call()
		if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "missing from disk") {
			t.Errorf("%s: want FailedPrecondition saying the directory is missing, got %v", name, err)
		}
	}
	for _, key := range []string{"new", "v"} {
		if _, err := s.Stat(ctx, key); !errdefs.IsNotFound(err) {
			t.Errorf("refused create left %q behind: %v", key, err)
		}
	}
	if _, err := s.View(ctx, "ok-view", "kept"); err != nil {
		t.Fatalf("an intact layer must still be served: %v", err)
	}
	if err := s.Remove(ctx, "container"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "lost"); err != nil {
		t.Fatalf("removing the broken snapshot: %v", err)
	}
	if m := s.Missing(); len(m) != 0 {
		t.Fatalf("missing after removing the broken one: %v", m)
	}
}

// TestOrphansDryRun: Orphans and ListOrphans list what Cleanup would
// delete, with sizes, and delete nothing.
func TestOrphansDryRun(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	orphan := filepath.Join(root, "snapshots", "42")
	if err := os.MkdirAll(filepath.Join(orphan, "fs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(orphan, "fs", "data"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../snapshots/42/fs", filepath.Join(root, "l", "16")); err != nil {
		t.Fatal(err)
	}

	check := func(name string, list []Orphan) {
		t.Helper()
		byPath := map[string]Orphan{}
		for _, o := range list {
			byPath[o.Path] = o
		}
		if o, ok := byPath[orphan]; !ok || o.Reason != ReasonNoMetadata || o.Size < 1<<20 || o.Inodes < 3 {
			t.Errorf("%s: orphan dir %+v (%v)", name, o, list)
		}
		if o, ok := byPath[filepath.Join(root, "l", "16")]; !ok || o.Reason != ReasonStaleLink {
			t.Errorf("%s: stale link %+v (%v)", name, o, list)
		}
		if len(list) != 2 {
			t.Errorf("%s: want 2 orphans, got %v", name, list)
		}
		there(t, orphan, filepath.Join(root, "l", "16"))
	}
	list, err := s.Orphans(ctx)
	if err != nil {
		t.Fatal(err)
	}
	check("running", list)
	if _, err := ListOrphans(ctx, root); err == nil || !strings.Contains(err.Error(), "stop it first") {
		t.Errorf("ListOrphans on a root in use: want a clear error, got %v", err)
	}
	s.Close()
	list, err = ListOrphans(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	check("stopped", list)
}

// TestCheck: the health check passes on a working root and fails once the
// root takes no new file (here an immutable root, which refuses even root;
// in the field a filesystem turned read-only after an I/O error) or the
// metadata is closed.
func TestCheck(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	s.health.reuse = 0 // the root changes between checks
	if err := s.Check(ctx); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("chattr", "+i", root).CombinedOutput(); err != nil {
		require.Skipf(t, "chattr +i: %v: %s", err, out)
	}
	defer exec.Command("chattr", "-i", root).Run()
	if err := s.Check(ctx); err == nil || !strings.Contains(err.Error(), "not writable") {
		t.Fatalf("check on a root that takes no file: %v", err)
	}
	if out, err := exec.Command("chattr", "-i", root).CombinedOutput(); err != nil {
		t.Fatalf("chattr -i: %v: %s", err, out)
	}
	if err := s.Check(ctx); err != nil {
		t.Fatalf("check after the root is writable again: %v", err)
	}
	s.Close()
	if err := s.Check(ctx); err == nil {
		t.Fatal("check passed on a closed snapshotter")
	}
}
