package fileops

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
	"golang.org/x/sys/unix"
)

// TestMetacopy lets the kernel (metacopy=on) make metadata-only copy-ups,
// including a renamed one that carries an absolute redirect, then checks
// that fileops reads their data from below like the kernel does, and that
// CopyUp completes them.
func TestMetacopy(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	mnt := loopfs.Mount(t, loopfs.XFS)
	lower, upper := filepath.Join(mnt, "lower"), filepath.Join(mnt, "upper")
	mustMkdir(t, upper)
	mustWrite(t, filepath.Join(lower, "m1"), bytes.Repeat([]byte("A"), 10000), 0o644)
	mustWrite(t, filepath.Join(lower, "m2"), bytes.Repeat([]byte("B"), 20000), 0o644)
	mustWrite(t, filepath.Join(lower, "d/m3"), bytes.Repeat([]byte("C"), 5000), 0o644)
	sparseFile(t, filepath.Join(lower, "sparse"))
	const opts = "metacopy=on,redirect_dir=on,index=off"
	merged := mountOverlay(t, upper, []string{lower}, opts)
	if err := os.Chmod(filepath.Join(merged, "m1"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(filepath.Join(merged, "d/m3"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(merged, "m2"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(merged, "m2"), filepath.Join(merged, "d/m2moved")); err != nil {
		t.Fatal(err)
	}
	mustXattr(t, filepath.Join(merged, "sparse"), "user.x", "1")
	unmountOverlay(t, merged)
	if _, ok, _ := getXattr(filepath.Join(upper, "m1"), "trusted.overlay.metacopy"); !ok {
		require.Skip(t, "the kernel made no metacopy file")
	}
	if r, _, _ := getXattr(filepath.Join(upper, "d/m2moved"), "trusted.overlay.redirect"); string(r) != "/m2" {
		t.Logf("redirect on the renamed metacopy file: %q", r)
	}

	merged = mountOverlay(t, upper, []string{lower}, opts)
	want, _ := walkTree(t, merged, skipOverlayXattrs)
	s, err := NewStack(upper, []string{lower})
	if err != nil {
		t.Fatal(err)
	}
	got := stackTree(t, s)
	compareTrees(t, "metacopy: Resolve/ReadDir vs kernel", want, got, true, nil)
	e, err := s.Resolve("d/m2moved")
	if err != nil || !e.Metacopy || e.DataLayer != 1 || e.DataPath != "m2" {
		t.Errorf("Resolve of the renamed metacopy file: %+v %v", e, err)
	}
	flat := filepath.Join(mnt, "flat")
	if _, err := Flatten(ctx, s, flat); err != nil {
		t.Fatal(err)
	}
	flatTree, _ := walkTree(t, flat, skipOverlayXattrs)
	compareTrees(t, "metacopy: Flatten vs kernel", want, flatTree, true, nil)
	unmountOverlay(t, merged)

	// Complete the copy-ups through fileops; the kernel must then read
	// the same data from the upper file alone.
	for _, p := range []string{"m1", "d/m2moved", "sparse"} {
		res, err := s.CopyUp(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		if res.Method != MethodReflink {
			t.Errorf("data copy-up of %s: %v", p, res.Method)
		}
		if _, ok, _ := getXattr(filepath.Join(upper, p), "trusted.overlay.metacopy"); ok {
			t.Errorf("%s still metacopy", p)
		}
	}
	if _, err := s.CopyRange(ctx, "d/m3", 0, "m1", 0, 100); err != nil {
		t.Fatal(err)
	}
	merged = mountOverlay(t, upper, []string{lower}, opts)
	after, _ := walkTree(t, merged, skipOverlayXattrs)
	want["m1"] = after["m1"] // changed by the CopyRange, checked below
	compareTrees(t, "kernel view after fileops completed the copy-ups", want, after, false, nil)
	if b := readFile(t, filepath.Join(merged, "m1")); !bytes.Equal(b[:100], bytes.Repeat([]byte("C"), 100)) || !bytes.Equal(b[100:], bytes.Repeat([]byte("A"), 9900)) {
		t.Errorf("m1 after CopyRange from a metacopy file's lower data: wrong bytes")
	}
	var st unix.Stat_t
	unix.Stat(filepath.Join(upper, "sparse"), &st)
	if st.Blocks*512 > 8<<20 {
		t.Errorf("sparse data copy-up filled holes")
	}
}

// TestMetacopyRenamedTwice follows a chain of renamed metacopy files: a
// file chmod'ed and renamed in one layer, chmod'ed and renamed again in
// the next. Each metacopy file carries its own redirect, and the kernel
// follows them all to the data (the differ met this in a container's
// upper).
func TestMetacopyRenamedTwice(t *testing.T) {
	needRoot(t)
	mnt := loopfs.Mount(t, loopfs.XFS)
	l1, l2, upper := filepath.Join(mnt, "l1"), filepath.Join(mnt, "l2"), filepath.Join(mnt, "upper")
	mustMkdir(t, l2)
	mustMkdir(t, upper)
	mustWrite(t, filepath.Join(l1, "f"), bytes.Repeat([]byte("D"), 7000), 0o644)
	mustMkdir(t, filepath.Join(l1, "d"))
	const opts = "metacopy=on,redirect_dir=on,index=off"
	merged := mountOverlay(t, l2, []string{l1}, opts)
	if err := os.Chmod(filepath.Join(merged, "f"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(merged, "f"), filepath.Join(merged, "f2")); err != nil {
		t.Fatal(err)
	}
	unmountOverlay(t, merged)
	merged = mountOverlay(t, upper, []string{l2, l1}, opts)
	if err := os.Chmod(filepath.Join(merged, "f2"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(merged, "f2"), filepath.Join(merged, "d/f3")); err != nil {
		t.Fatal(err)
	}
	unmountOverlay(t, merged)
	if _, ok, _ := getXattr(filepath.Join(upper, "d/f3"), "trusted.overlay.metacopy"); !ok {
		require.Skip(t, "the kernel made no metacopy file")
	}
	merged = mountOverlay(t, upper, []string{l2, l1}, opts)
	want, _ := walkTree(t, merged, skipOverlayXattrs)
	s, err := NewStack(upper, []string{l2, l1})
	if err != nil {
		t.Fatal(err)
	}
	compareTrees(t, "renamed metacopy chain: Resolve/ReadDir vs kernel", want, stackTree(t, s), true, nil)
	e, err := s.Resolve("d/f3")
	if err != nil || !e.Metacopy || e.DataLayer != 2 || e.DataPath != "f" {
		t.Errorf("Resolve(d/f3) = %+v, %v; want data in layer 2 at f", e, err)
	}
}

// TestRedirectThroughRenamedDir renames, in a later layer, entries that
// live inside a directory an earlier layer renamed: a subdirectory and a
// metacopy file. Their absolute redirects name the renamed directory's
// new path, and the lookup below must turn at that directory's own
// redirect to find them, as the kernel does.
func TestRedirectThroughRenamedDir(t *testing.T) {
	needRoot(t)
	mnt := loopfs.Mount(t, loopfs.XFS)
	l1, l2, upper := filepath.Join(mnt, "l1"), filepath.Join(mnt, "l2"), filepath.Join(mnt, "upper")
	mustMkdir(t, l2)
	mustMkdir(t, upper)
	mustWrite(t, filepath.Join(l1, "x/sub/data"), []byte("in sub"), 0o644)
	mustWrite(t, filepath.Join(l1, "x/file"), bytes.Repeat([]byte("E"), 9000), 0o644)
	const opts = "metacopy=on,redirect_dir=on,index=off"
	merged := mountOverlay(t, l2, []string{l1}, opts)
	if err := os.Rename(filepath.Join(merged, "x"), filepath.Join(merged, "y")); err != nil {
		t.Fatal(err)
	}
	unmountOverlay(t, merged)
	merged = mountOverlay(t, upper, []string{l2, l1}, opts)
	if err := os.Rename(filepath.Join(merged, "y/sub"), filepath.Join(merged, "z")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(merged, "y/file"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(merged, "y/file"), filepath.Join(merged, "moved")); err != nil {
		t.Fatal(err)
	}
	unmountOverlay(t, merged)
	if r, _, _ := getXattr(filepath.Join(upper, "z"), "trusted.overlay.redirect"); string(r) != "/y/sub" {
		t.Logf("redirect of z: %q", r)
	}
	merged = mountOverlay(t, upper, []string{l2, l1}, opts)
	want, _ := walkTree(t, merged, skipOverlayXattrs)
	if _, ok := want["z/data"]; !ok {
		t.Fatalf("the kernel shows no z/data: %v", sortedKeys(want))
	}
	s, err := NewStack(upper, []string{l2, l1})
	if err != nil {
		t.Fatal(err)
	}
	compareTrees(t, "redirects through a renamed dir: Resolve/ReadDir vs kernel", want, stackTree(t, s), true, nil)
}
