package snapshotter

import (
	"os"
	"path/filepath"
	"testing"
)

// usageFile is big enough that block rounding cannot hide a double count.
const usageFile = 1 << 20

// TestUsage, in overlay mode (pinned: auto picks userspace on a kernel
// whose overlay does not intercept range ops, and there an active holds
// its parent's files): a file hard-linked three times counts once; an
// active snapshot's usage is its upper only, not its parents; a committed
// one's is what Commit recorded, even if the directory changes behind its
// back (nothing walks a committed layer again).
func TestUsage(t *testing.T) {
	ctx, s := openTest(t, t.TempDir(), WithMode(ModeOverlay))
	if s.Mode() != ModeOverlay {
		t.Fatalf("mode %s, want overlay", s.Mode())
	}

	if _, err := s.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	dir := bindSource(ctx, t, s, "base-active")
	if err := os.WriteFile(filepath.Join(dir, "a"), make([]byte, usageFile), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"b", "c"} {
		if err := os.Link(filepath.Join(dir, "a"), filepath.Join(dir, l)); err != nil {
			t.Fatal(err)
		}
	}
	u, err := s.Usage(ctx, "base-active")
	if err != nil {
		t.Fatal(err)
	}
	if u.Size < usageFile || u.Size >= 2*usageFile {
		t.Fatalf("three hard links to one %d-byte file use %d bytes: counted more than once", usageFile, u.Size)
	}
	// The fs dir and one inode for the three names.
	if u.Inodes != 2 {
		t.Fatalf("inodes %d, want 2 (the dir and the file)", u.Inodes)
	}
	if err := s.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	committed, err := s.Usage(ctx, "base")
	if err != nil {
		t.Fatal(err)
	}
	if committed != u {
		t.Fatalf("committed usage %+v, active usage was %+v", committed, u)
	}
	// Recorded once: a file slipped into the layer afterwards is not seen.
	if err := os.WriteFile(filepath.Join(s.upperPath("1"), "late"), make([]byte, usageFile), 0o644); err != nil {
		t.Fatal(err)
	}
	if again, _ := s.Usage(ctx, "base"); again != committed {
		t.Fatalf("committed usage walked again: %+v then %+v", committed, again)
	}

	if _, err := s.Prepare(ctx, "child", "base"); err != nil {
		t.Fatal(err)
	}
	child, err := s.Usage(ctx, "child")
	if err != nil {
		t.Fatal(err)
	}
	if child.Size >= usageFile || child.Inodes != 1 {
		t.Fatalf("an empty active on a %d-byte parent uses %+v: the parent was walked", usageFile, child)
	}
}
