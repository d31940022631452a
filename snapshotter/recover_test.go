package snapshotter

import (
	"os"
	"path/filepath"
	"testing"
)

// TestReusedIDAfterCrash: a crash between placing a snapshot's directory
// and committing bolt leaves snapshots/<id> (full, if it was a userspace
// copy) and maybe the layer's short link, with nothing in the metadata;
// bolt's sequence rolls back, so the next create gets the same id. The
// restart removes what the crash left; the next Prepare gets the id on a
// clean directory; its Commit records the usage of what the new snapshot
// holds, not of the crashed one's files.
func TestReusedIDAfterCrash(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// What the crash leaves: id 2's directory, full, and its link; the
	// metadata knows only id 1.
	leftover := filepath.Join(root, "snapshots", "2")
	if err := os.MkdirAll(filepath.Join(leftover, "fs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(leftover, "work"), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(leftover, "fs", "stale"), make([]byte, usageFile), 0o644); err != nil {
		t.Fatal(err)
	}
	staleLink := filepath.Join(root, "l", shortName("2"))
	if err := os.Symlink("../snapshots/2/fs", staleLink); err != nil {
		t.Fatal(err)
	}

	ctx, s = openTest(t, root)
	gone(t, leftover, staleLink)
	m, err := s.Prepare(ctx, "b", "")
	if err != nil {
		t.Fatalf("Prepare after a crash left id 2's directory: %v", err)
	}
	if want := s.upperPath("2"); m[0].Source != want {
		t.Fatalf("Prepare after the crash mounts %s, want the reused id's %s", m[0].Source, want)
	}
	if _, err := os.Stat(filepath.Join(m[0].Source, "stale")); !os.IsNotExist(err) {
		t.Fatalf("the new snapshot sees the crashed one's files: %v", err)
	}
	if err := os.WriteFile(filepath.Join(m[0].Source, "new"), []byte("after the crash"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "b-committed", "b"); err != nil {
		t.Fatalf("commit on the reused id: %v", err)
	}
	u, err := s.Usage(ctx, "b-committed")
	if err != nil {
		t.Fatal(err)
	}
	// The fs dir and "new": a few blocks, nowhere near the stale file.
	if u.Inodes != 2 || u.Size >= usageFile {
		t.Fatalf("the reused id's Commit recorded %+v, want 2 inodes and less than %d bytes", u, usageFile)
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
	// Cleanup takes the orphan out of snapshots/ before it returns; it
	// is deleted from the trash in the background, and Collect waits
	// for that.
	gone(t, orphan, staleLink)
	there(t, inFlight, filepath.Join(root, "snapshots", "1", "fs"), filepath.Join(root, "l", "1"))
	if err := s.Collect(ctx); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(filepath.Join(root, trashDir)); len(left) != 0 {
		t.Fatalf("%d entries left in the trash after Collect", len(left))
	}
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

// TestRemoveRenamesThenDeletes: after Remove the layer link is gone at
// once; the directory goes from snapshots/ to the trash in the background,
// and the trash is emptied.
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
	gone(t, filepath.Join(root, "l", "1"))
	s.deletions.wait()
	gone(t, filepath.Join(root, "snapshots", "1"))
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
