package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/overclone/overclone/test/image/view"
)

// TestViewToFile checks the out argument the e2e tests rely on: the file
// holds exactly what the viewer prints, and nothing else is left in its dir
// (the temporary name is renamed, not copied).
func TestViewToFile(t *testing.T) {
	root, outDir := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "a.txt"), []byte("a\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(root, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	var want strings.Builder
	if err := view.Write(&want, root); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(outDir, "view.txt")
	if err := run([]string{"view", root, out}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want.String() {
		t.Errorf("view file:\n%s\nwant:\n%s", got, want.String())
	}
	names, err := os.ReadDir(outDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != 1 {
		t.Errorf("out dir holds %d entries, want only view.txt: %v", len(names), names)
	}
}

// TestViewToFileFails checks that a view that cannot be made leaves no file
// under the name the tests read.
func TestViewToFileFails(t *testing.T) {
	outDir := t.TempDir()
	out := filepath.Join(outDir, "view.txt")
	if err := run([]string{"view", filepath.Join(outDir, "missing"), out}); err == nil {
		t.Fatal("viewing a missing root succeeded")
	}
	names, err := os.ReadDir(outDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != 0 {
		t.Errorf("a failed view left %v", names)
	}
}

// TestRenameCopies checks the fallback the CRI test relies on when the
// kernel refuses a rename: the copy has the tree's names, modes and
// contents, and the old name is gone. It is called directly, as no
// filesystem here answers EXDEV within one directory.
func TestRenameCopies(t *testing.T) {
	root := t.TempDir()
	src, dst := filepath.Join(root, "src"), filepath.Join(root, "dst")
	if err := os.MkdirAll(filepath.Join(src, "sub"), 0o775); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "sub", "f"), []byte("f\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("sub/f", filepath.Join(src, "l")); err != nil {
		t.Fatal(err)
	}
	var want strings.Builder
	if err := view.Write(&want, src); err != nil {
		t.Fatal(err)
	}
	if err := copyTree(src, dst); err != nil {
		t.Fatal(err)
	}
	var got strings.Builder
	if err := view.Write(&got, dst); err != nil {
		t.Fatal(err)
	}
	if got.String() != want.String() {
		t.Errorf("copy:\n%s\nwant:\n%s", got.String(), want.String())
	}
}

// TestFill checks fill writes the size asked for, allocated.
func TestFill(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := run([]string{"fill", p, "3000000"}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 3000000 {
		t.Errorf("size %d, want 3000000", fi.Size())
	}
	if blocks := fi.Sys().(*syscall.Stat_t).Blocks * 512; blocks < 3000000 {
		t.Errorf("%d bytes allocated, want at least 3000000", blocks)
	}
}
