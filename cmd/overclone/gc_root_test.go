package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestGCRootMustExist: with no daemon to ask, `overclone gc --root` on a
// path that holds no overclone root fails and names it, with or without
// --dry-run, and creates nothing: a typo must not make (and probe) a new
// root, nor fill an unrelated directory with a root's subdirectories.
func TestGCRootMustExist(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "none.sock")
	for _, tc := range []struct {
		name string
		root string
	}{
		{"missing", filepath.Join(dir, "typo")},
		{"not a root", t.TempDir()},
	} {
		for _, dry := range []bool{false, true} {
			args := []string{"gc", "--address", sock, "--root", tc.root}
			if dry {
				args = append(args, "--dry-run")
			}
			t.Run(strings.Join(append([]string{tc.name}, args[5:]...), " "), func(t *testing.T) {
				before, _ := os.ReadDir(tc.root)
				var out, errb bytes.Buffer
				code := dispatch(context.Background(), args, &out, &errb)
				if code != exitFail || !strings.Contains(errb.String(), "no overclone root at "+tc.root) {
					t.Errorf("gc on %s: exit %d, stderr %q", tc.root, code, errb.String())
				}
				after, err := os.ReadDir(tc.root)
				if len(after) != len(before) || (len(before) == 0 && err == nil && tc.name == "missing") {
					t.Errorf("gc on %s created something: %v %v", tc.root, after, err)
				}
			})
		}
	}
}
