package fileops

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// TestCopyInOut copies trees out of and into a stack and checks the result
// through the kernel's mount of the same layers.
func TestCopyInOut(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	mnt := loopfs.Mount(t, loopfs.XFS)
	lower, upper := filepath.Join(mnt, "lower"), filepath.Join(mnt, "upper")
	mustWrite(t, filepath.Join(lower, "a/x"), []byte("lower x"), 0o644)
	mustWrite(t, filepath.Join(lower, "a/y"), []byte("lower y"), 0o600)
	mustWrite(t, filepath.Join(lower, "b/hidden"), []byte("hidden by the whiteout"), 0o644)
	mustWrite(t, filepath.Join(upper, "a/z"), []byte("upper z"), 0o644)
	mustWhiteout(t, filepath.Join(upper, "b"))
	os.Chown(filepath.Join(lower, "a/y"), 1000, 1000)
	mustXattr(t, filepath.Join(lower, "a/x"), "user.note", "n")

	host := filepath.Join(mnt, "host")
	mustWrite(t, filepath.Join(host, "tree/one"), []byte("one"), 0o640)
	mustWrite(t, filepath.Join(host, "tree/sub/two"), bytes.Repeat([]byte("2"), 70000), 0o755)
	os.Symlink("one", filepath.Join(host, "tree/sym"))
	os.Link(filepath.Join(host, "tree/one"), filepath.Join(host, "tree/sub/one-link"))
	mustXattr(t, filepath.Join(host, "tree/one"), "trusted.overlay.opaque", "y") // must not come in
	mustWrite(t, filepath.Join(host, "newy"), []byte("host y"), 0o644)

	s, err := NewStack(upper, []string{lower})
	if err != nil {
		t.Fatal(err)
	}
	// out: a merged dir and a single file
	if _, err := s.CopyOut(ctx, "a", filepath.Join(mnt, "out-a")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CopyOut(ctx, "a/y", filepath.Join(mnt, "out-y")); err != nil {
		t.Fatal(err)
	}
	// in: a tree where a whiteout hides a lower dir, a file over a lower
	// file, a tree into a merged dir, a new tree below a missing dir.
	steps := []struct{ src, dst string }{
		{filepath.Join(host, "tree"), "b"},
		{filepath.Join(host, "newy"), "a/y"},
		{filepath.Join(host, "tree"), "a"},
		{filepath.Join(host, "tree"), "new/deeper"},
	}
	for _, st := range steps {
		if _, err := s.CopyIn(ctx, st.src, st.dst); err != nil {
			t.Fatalf("CopyIn(%s, %s): %v", st.src, st.dst, err)
		}
	}
	merged := mountOverlay(t, "", []string{upper, lower}, "")
	kernel, _ := walkTree(t, merged, skipOverlayXattrs)
	hostTree, _ := walkTree(t, filepath.Join(host, "tree"), skipOverlayXattrs)
	sub := func(tr tree, prefix string) tree {
		out := tree{}
		for k, v := range tr {
			if len(k) > len(prefix) && k[:len(prefix)+1] == prefix+"/" {
				out[k[len(prefix)+1:]] = v
			}
		}
		return out
	}
	compareTrees(t, "b (opaque over a whiteout) vs host tree", hostTree, sub(kernel, "b"), true, nil)
	compareTrees(t, "new/deeper vs host tree", hostTree, sub(kernel, "new/deeper"), true, nil)
	if got := string(readFile(t, filepath.Join(merged, "a/y"))); got != "host y" {
		t.Errorf("a/y reads %q after CopyIn", got)
	}
	var names []string
	for k := range sub(kernel, "a") {
		names = append(names, k)
	}
	sort.Strings(names)
	want := []string{"one", "sub", "sub/one-link", "sub/two", "sym", "x", "y", "z"}
	if len(names) != len(want) {
		t.Errorf("merged a holds %v, want %v", names, want)
	}
	if v, ok, _ := getXattr(filepath.Join(upper, "b/one"), "trusted.overlay.opaque"); ok {
		t.Errorf("overlay xattr %q carried in from the host", v)
	}
	var st1, st2 unix.Stat_t
	unix.Lstat(filepath.Join(upper, "b/one"), &st1)
	unix.Lstat(filepath.Join(upper, "b/sub/one-link"), &st2)
	if st1.Ino != st2.Ino {
		t.Errorf("host hard link not kept")
	}
	outA, _ := walkTree(t, filepath.Join(mnt, "out-a"), skipOverlayXattrs)
	if len(outA) != 3 || outA["x"].Xattrs != "user.note=n" || outA["y"].UID != 1000 || string(readFile(t, filepath.Join(mnt, "out-y"))) != "lower y" {
		t.Errorf("CopyOut: %v", outA)
	}
	if ents, _ := os.ReadDir(upper); len(ents) != 3 {
		t.Errorf("upper root holds %d entries (staging left?)", len(ents))
	}
}

// TestTarWhiteouts checks OCI ".wh." semantics, only when asked for.
func TestTarWhiteouts(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	lower, upper := filepath.Join(base, "lower"), filepath.Join(base, "upper")
	for _, p := range []string{"a/x", "a/y", "b/z", "c/w", "keep"} {
		mustWrite(t, filepath.Join(lower, p), []byte(p), 0o644)
	}
	for _, p := range []string{".wh.b", "a/.wh.x", "c/.wh..wh..opq", "c/new", ".wh.keep-not-there"} {
		mustWrite(t, filepath.Join(upper, p), nil, 0o644)
	}
	list := func(s *Stack, dir string) []string {
		ents, err := s.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range ents {
			out = append(out, e.Info.Name())
		}
		return out
	}
	tar, err := NewStack(upper, []string{lower}, WithTarWhiteouts())
	if err != nil {
		t.Fatal(err)
	}
	plain, err := NewStack(upper, []string{lower})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		s    *Stack
		dir  string
		want string
	}{
		{tar, "", "[a c keep]"},
		{tar, "a", "[y]"},
		{tar, "c", "[new]"},
		{plain, "", "[.wh.b .wh.keep-not-there a b c keep]"},
		{plain, "a", "[.wh.x x y]"},
	} {
		if got := sprint(list(c.s, c.dir)); got != c.want {
			t.Errorf("ReadDir(%q) tar=%v: %s, want %s", c.dir, c.s.cfg.tarWhiteouts, got, c.want)
		}
	}
	if _, err := tar.Resolve("b/z"); err == nil {
		t.Error("b/z visible through .wh.b")
	}
	if _, err := tar.Resolve(".wh.b"); err == nil {
		t.Error(".wh.b itself visible")
	}
	// CopyIn over a tar whiteout removes it and makes the new dir opaque.
	host := filepath.Join(base, "host")
	mustWrite(t, filepath.Join(host, "only"), []byte("o"), 0o644)
	if _, err := tar.CopyIn(context.Background(), host, "b"); err != nil {
		t.Fatal(err)
	}
	if got := sprint(list(tar, "b")); got != "[only]" {
		t.Errorf("b after CopyIn over .wh.b: %s", got)
	}
}

func sprint(s []string) string {
	b := []byte("[")
	for i, x := range s {
		if i > 0 {
			b = append(b, ' ')
		}
		b = append(b, x...)
	}
	return string(append(b, ']'))
}

// TestCopyInHostSwap: a host directory swapped for a symlink while CopyIn
// reads it is copied as it was when opened. Nothing the link leads to
// comes in: below the source CopyIn was given, no host name is resolved
// twice.
func TestCopyInHostSwap(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	mnt := loopfs.Mount(t, loopfs.Tmpfs)
	lower, upper := filepath.Join(mnt, "lower"), filepath.Join(mnt, "upper")
	mustWrite(t, filepath.Join(lower, "keep"), []byte("lower"), 0o644)
	if err := os.MkdirAll(upper, 0o755); err != nil {
		t.Fatal(err)
	}
	host := filepath.Join(mnt, "host")
	mustWrite(t, filepath.Join(host, "tree/d/mine"), []byte("mine"), 0o644)
	mustWrite(t, filepath.Join(mnt, "secret/key"), []byte("not for the container"), 0o600)

	swapped := false
	hostDirOpenedHook = func(p string) {
		if p != filepath.Join(host, "tree/d") || swapped {
			return
		}
		swapped = true
		d := filepath.Join(host, "tree/d")
		if err := os.Rename(d, d+".moved"); err != nil {
			t.Error(err)
		}
		if err := os.Symlink(filepath.Join(mnt, "secret"), d); err != nil {
			t.Error(err)
		}
	}
	t.Cleanup(func() { hostDirOpenedHook = nil })

	s, err := NewStack(upper, []string{lower})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CopyIn(ctx, filepath.Join(host, "tree"), "in"); err != nil {
		t.Fatal(err)
	}
	if !swapped {
		t.Fatal("the hook never saw tree/d")
	}
	merged := mountOverlay(t, "", []string{upper, lower}, "")
	if got := string(readFile(t, filepath.Join(merged, "in/d/mine"))); got != "mine" {
		t.Errorf("in/d/mine reads %q", got)
	}
	if _, err := os.Lstat(filepath.Join(merged, "in/d/key")); err == nil {
		t.Error("the copy followed the swapped-in link: in/d/key is there")
	}
}
