package fileops

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// sparseFile writes 1 MiB of data, a 30 MiB hole and 1 MiB of data.
func sparseFile(t testing.TB, p string) []byte {
	t.Helper()
	mustMkdir(t, filepath.Dir(p))
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	if _, err := f.WriteAt(chunk, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(chunk, 31<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return chunk
}

func allocated(t testing.TB, p string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// sharedExtents reports whether filefrag marks any extent of p shared.
func sharedExtents(t testing.TB, p string) bool {
	t.Helper()
	out, err := exec.Command("filefrag", "-v", p).CombinedOutput()
	if err != nil {
		t.Fatalf("filefrag %s: %v: %s", p, err, out)
	}
	return strings.Contains(string(out), "shared")
}

// TestCopyUpMethods runs a copy-up of a sparse file with xattrs on every
// backing filesystem with each data method: reflink must serve and share
// extents where the filesystem has it, the fallbacks elsewhere, and the
// bytes, holes and metadata must come out the same everywhere.
func TestCopyUpMethods(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	for _, k := range loopfs.All {
		t.Run(string(k), func(t *testing.T) {
			mnt := loopfs.Mount(t, k)
			lower := filepath.Join(mnt, "lower")
			src := filepath.Join(lower, "d", "sparse")
			sparseFile(t, src)
			if err := os.Chown(src, 1000, 100); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(src, 0o4755); err != nil {
				t.Fatal(err)
			}
			mustXattr(t, src, "security.capability", string(capV2))
			mustXattr(t, src, "trusted.keep", "1")
			mustXattr(t, src, "trusted.overlay.origin", "dropped")
			want := readNode(t, src, skipOverlayXattrs)
			cases := []struct {
				name    string
				methods []Method
				want    Method
			}{
				{"default", nil, map[bool]Method{true: MethodReflink, false: MethodCopyFileRange}[k.Reflinks()]},
				{"copy_file_range", []Method{MethodCopyFileRange}, MethodCopyFileRange},
				{"read_write", []Method{MethodReadWrite}, MethodReadWrite},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					upper := filepath.Join(mnt, "upper-"+c.name)
					mustMkdir(t, upper)
					var opts []StackOpt
					if c.methods != nil {
						opts = append(opts, WithDataMethods(c.methods...))
					}
					s, err := NewStack(upper, []string{lower}, opts...)
					if err != nil {
						t.Fatal(err)
					}
					res, err := s.CopyUp(ctx, "d/sparse")
					if err != nil {
						t.Fatal(err)
					}
					if res.Method != c.want {
						t.Errorf("method %v, want %v", res.Method, c.want)
					}
					dst := filepath.Join(upper, "d", "sparse")
					got := readNode(t, dst, skipOverlayXattrs)
					got.Mtime = want.Mtime
					got.Ino, got.Dev = want.Ino, want.Dev
					if got != want {
						t.Errorf("copy differs:\n want %s\n  got %s", want, got)
					}
					if v, ok, _ := getXattr(dst, "trusted.overlay.origin"); ok {
						t.Errorf("overlay-private xattr copied: %q", v)
					}
					var a, b unix.Stat_t
					unix.Lstat(src, &a)
					unix.Lstat(dst, &b)
					if a.Mtim != b.Mtim {
						t.Errorf("mtime %v, want %v", b.Mtim, a.Mtim)
					}
					if res.Method != MethodReflink && allocated(t, dst) > 8<<20 {
						t.Errorf("holes filled: %d bytes allocated for 2 MiB of data", allocated(t, dst))
					}
					if res.Method == MethodReflink && !sharedExtents(t, dst) {
						t.Errorf("reflink copy-up shares no extent")
					}
					if k.Reflinks() && c.name == "copy_file_range" && !sharedExtents(t, dst) {
						t.Logf("copy_file_range did not share extents on %s", k)
					}
					// the parent dir came up with its own attributes
					pn := readNode(t, filepath.Join(upper, "d"), skipOverlayXattrs)
					pw := readNode(t, filepath.Join(lower, "d"), skipOverlayXattrs)
					if pn.Mode != pw.Mode || pn.Mtime != pw.Mtime {
						t.Errorf("parent dir %s, want %s", pn, pw)
					}
					// a second copy-up is a no-op
					if res, err := s.CopyUp(ctx, "d/sparse"); err != nil || res.Method != MethodNone {
						t.Errorf("second CopyUp = %v, %v", res, err)
					}
				})
			}
			if !k.Reflinks() {
				upper := filepath.Join(mnt, "upper-reflink-only")
				mustMkdir(t, upper)
				s, err := NewStack(upper, []string{lower}, WithDataMethods(MethodReflink))
				if err != nil {
					t.Fatal(err)
				}
				if _, err := s.CopyUp(ctx, "d/sparse"); err == nil {
					t.Errorf("reflink-only copy-up on %s succeeded", k)
				}
				if _, err := os.Lstat(filepath.Join(upper, "d", "sparse")); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("failed copy-up left a file: %v", err)
				}
			}
			c, err := ProbeCaps(mnt)
			if err != nil {
				t.Fatal(err)
			}
			if (c.Reflink == Yes) != k.Reflinks() {
				t.Errorf("ProbeCaps reflink %v on %s", c.Reflink, k)
			}
		})
	}
}

// TestCopyUpKinds copies up every file type, hard links and an entry
// whose parents are missing in the upper, with and without a work dir.
func TestCopyUpKinds(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	mnt := loopfs.Mount(t, loopfs.XFS)
	for _, mode := range []string{"tmpfile", "workdir", "named"} {
		name, withWork := mode, mode == "workdir"
		t.Run(name, func(t *testing.T) {
			noTmpfile = mode == "named"
			defer func() { noTmpfile = false }()
			base := filepath.Join(mnt, name)
			lower, upper, work := filepath.Join(base, "lower"), filepath.Join(base, "upper"), filepath.Join(base, "work")
			for _, d := range []string{upper, work} {
				mustMkdir(t, d)
			}
			mustWrite(t, filepath.Join(lower, "x/y/file"), []byte("data"), 0o640)
			if err := os.Link(filepath.Join(lower, "x/y/file"), filepath.Join(lower, "x/link")); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink("../../etc/shadow", filepath.Join(lower, "x/sym")); err != nil {
				t.Fatal(err)
			}
			unix.Mknod(filepath.Join(lower, "x/fifo"), unix.S_IFIFO|0o620, 0)
			unix.Mknod(filepath.Join(lower, "x/sock"), unix.S_IFSOCK|0o600, 0)
			unix.Mknod(filepath.Join(lower, "x/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3)))
			unix.Mknod(filepath.Join(lower, "x/blk"), unix.S_IFBLK|0o660, int(unix.Mkdev(7, 200)))
			os.Lchown(filepath.Join(lower, "x/sym"), 1000, 1000)
			mustXattr(t, filepath.Join(lower, "x"), "user.dir", "d")
			mustXattr(t, filepath.Join(lower, "x/sym"), "trusted.sym", "s")
			opts := []StackOpt{}
			if withWork {
				opts = append(opts, WithWorkDir(work))
			}
			s, err := NewStack(upper, []string{lower}, opts...)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"x/y/file", "x/link", "x/sym", "x/fifo", "x/sock", "x/null", "x/blk", "x/y", "/x/../x/./y/file"} {
				if _, err := s.CopyUp(ctx, p); err != nil {
					t.Fatalf("CopyUp(%q): %v", p, err)
				}
			}
			want, _ := walkTree(t, lower, nil)
			got, _ := walkTree(t, upper, nil)
			compareTrees(t, "upper vs lower", want, got, true, nil)
			if got["x/link"].Ino != got["x/y/file"].Ino {
				t.Errorf("hard link broken by copy-up")
			}
			if ents, _ := os.ReadDir(work); len(ents) != 0 {
				t.Errorf("work dir not empty: %v", ents)
			}
			if ents, _ := os.ReadDir(filepath.Join(upper, "x")); len(ents) != 7 {
				t.Errorf("upper/x holds %d entries, want 7 (staging names left?)", len(ents))
			}
		})
	}
}

// TestCopyUpCanceled checks that a copy-up stopped half way leaves no
// half-written file in the upper.
func TestCopyUpCanceled(t *testing.T) {
	needRoot(t)
	mnt := loopfs.Mount(t, loopfs.Ext4)
	lower, upper := filepath.Join(mnt, "lower"), filepath.Join(mnt, "upper")
	mustMkdir(t, upper)
	mustWrite(t, filepath.Join(lower, "big"), bytes.Repeat([]byte{1}, 32<<20), 0o644)
	s, err := NewStack(upper, []string{lower}, WithDataMethods(MethodReadWrite))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.CopyUp(ctx, "big"); !errors.Is(err, context.Canceled) {
		t.Fatalf("CopyUp with a canceled context: %v", err)
	}
	if ents, _ := os.ReadDir(upper); len(ents) != 0 {
		t.Fatalf("upper holds %v after a canceled copy-up", ents)
	}
}

// TestUpperOnOtherFilesystem copies up from an ext4 lower into an xfs
// upper: reflink and copy_file_range give EXDEV, read/write serves.
func TestUpperOnOtherFilesystem(t *testing.T) {
	needRoot(t)
	a, b := loopfs.Mount(t, loopfs.Ext4), loopfs.Mount(t, loopfs.XFS)
	data := sparseFile(t, filepath.Join(a, "f"))
	s, err := NewStack(b, []string{a})
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.CopyUp(context.Background(), "f")
	if err != nil {
		t.Fatal(err)
	}
	if res.Method != MethodReadWrite {
		t.Errorf("method %v, want read_write", res.Method)
	}
	got := readFile(t, filepath.Join(b, "f"))
	if !bytes.Equal(got[:len(data)], data) || !bytes.Equal(got[31<<20:], data) || len(got) != 32<<20 {
		t.Errorf("content differs")
	}
	if allocated(t, filepath.Join(b, "f")) > 8<<20 {
		t.Errorf("holes filled across filesystems")
	}
}
