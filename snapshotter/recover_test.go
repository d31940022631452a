package snapshotter

import (
	"os"
	"path/filepath"
	"testing"
)

// TestReusedIDAfterCrash: bolt hands out the id of a create whose
// transaction never committed again, and that create may have left its
// directory in place. The next Prepare must succeed on a clean directory.
func TestReusedIDAfterCrash(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	// What a crash between the rename and the bolt commit leaves: the
	// next id's directory, full.
	leftover := filepath.Join(root, "snapshots", "2", "fs")
	if err := os.MkdirAll(leftover, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(leftover, "stale"), []byte("from before the crash"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../snapshots/2/fs", filepath.Join(root, "l", "2")); err != nil {
		t.Fatal(err)
	}
	m, err := s.Prepare(ctx, "b", "")
	if err != nil {
		t.Fatalf("Prepare after a crash left id 2's directory: %v", err)
	}
	if m[0].Source != leftover {
		t.Fatalf("expected id 2 to be reused, got %s", m[0].Source)
	}
	if _, err := os.Stat(filepath.Join(leftover, "stale")); !os.IsNotExist(err) {
		t.Fatalf("the new snapshot sees the crashed one's files: %v", err)
	}
	if err := s.Commit(ctx, "b-committed", "b"); err != nil {
		t.Fatalf("commit over a stale link: %v", err)
	}
}

// TestOrphansRemoved: directories and links that no metadata names are
// removed by Cleanup while running (but not a create in flight), and at
// start, where also cut-short creates and the trash go.
func TestOrphansRemoved(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	if _, err := s.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	mk := func(rel string) string {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	orphan := mk("snapshots/77/fs")
	inFlight := mk("snapshots/new-12345/fs")
	// A link of a live layer (a deep stack made it) and one of a layer
	// that is gone.
	if err := s.ensureLink("1"); err != nil {
		t.Fatal(err)
	}
	staleLink := filepath.Join(root, "l", "25")
	if err := os.Symlink("../snapshots/77/fs", staleLink); err != nil {
		t.Fatal(err)
	}

	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	gone(t, orphan, staleLink)
	there(t, inFlight, filepath.Join(root, "snapshots", "1", "fs"), filepath.Join(root, "l", "1"))
	s.Close()

	trashed := mk("trash/9-xyz/fs")
	s, err := New(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.deletions.wait()
	gone(t, inFlight, trashed)
	if _, err := s.View(ctx, "v", "base"); err != nil {
		t.Fatal(err)
	}
}

// TestRemoveRenamesThenDeletes: after Remove the directory is gone from
// snapshots/ at once, and the trash is emptied.
func TestRemoveRenamesThenDeletes(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	if err := s.ensureLink("1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	gone(t, filepath.Join(root, "snapshots", "1"), filepath.Join(root, "l", "1"))
	s.deletions.wait()
	entries, err := os.ReadDir(filepath.Join(root, "trash"))
	if err != nil || len(entries) != 0 {
		t.Fatalf("trash not emptied: %v %v", entries, err)
	}
}

func gone(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("%s should be gone: %v", p, err)
		}
	}
}

func there(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("%s should be there: %v", p, err)
		}
	}
}
