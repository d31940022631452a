package main

import (
	"os"
	"path/filepath"
	"strings"
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
