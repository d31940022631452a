package fileops

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/require"
)

// node is what the oracle compares of one entry.
type node struct {
	Kind   Kind
	Mode   uint32 // permission and set-id bits
	UID    uint32
	GID    uint32
	Size   int64 // regular files only
	Sum    string
	Link   string
	Rdev   uint64
	Xattrs string
	Mtime  unix.Timespec
	Ino    uint64 // for hard-link grouping, not compared directly
	Dev    uint64
}

func (n node) String() string {
	return fmt.Sprintf("%s %o %d:%d size=%d sum=%.8s link=%q rdev=%d xattrs=[%s]", n.Kind, n.Mode, n.UID, n.GID, n.Size, n.Sum, n.Link, n.Rdev, n.Xattrs)
}

// tree maps a slash path ("" excluded) to its node.
type tree map[string]node

// readNode describes the real file at p.
func readNode(t testing.TB, p string, skipXattr func(string) bool) node {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatalf("lstat %s: %v", p, err)
	}
	n := node{Kind: kindOf(st.Mode), Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid, Mtime: st.Mtim, Ino: st.Ino, Dev: st.Dev}
	switch n.Kind {
	case KindFile:
		n.Size = st.Size
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			t.Fatal(err)
		}
		f.Close()
		n.Sum = hex.EncodeToString(h.Sum(nil))
	case KindSymlink:
		l, err := os.Readlink(p)
		if err != nil {
			t.Fatal(err)
		}
		n.Link = l
		n.Mode = 0
	case KindCharDevice, KindBlockDevice:
		n.Rdev = st.Rdev
	}
	xs, err := listXattrs(p)
	if err != nil {
		t.Fatalf("xattrs of %s: %v", p, err)
	}
	var parts []string
	for _, x := range xs {
		if skipXattr != nil && skipXattr(x.name) {
			continue
		}
		parts = append(parts, x.name+"="+string(x.value))
	}
	sort.Strings(parts)
	n.Xattrs = strings.Join(parts, ",")
	return n
}

func skipOverlayXattrs(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "user.overlay.")
}

// walkTree reads a real directory tree. hide, if set, drops names that
// readdir lists but lstat cannot find (the kernel's xattr-whiteout case).
func walkTree(t testing.TB, root string, skipXattr func(string) bool) (tree, []string) {
	t.Helper()
	out := tree{}
	var ghosts []string
	var walk func(rel string)
	walk = func(rel string) {
		ents, err := os.ReadDir(filepath.Join(root, rel))
		if err != nil {
			t.Fatalf("readdir %s: %v", rel, err)
		}
		for _, de := range ents {
			p := joinRel(rel, de.Name())
			if _, err := os.Lstat(filepath.Join(root, p)); errors.Is(err, os.ErrNotExist) {
				ghosts = append(ghosts, p)
				continue
			}
			n := readNode(t, filepath.Join(root, p), skipXattr)
			out[p] = n
			if n.Kind == KindDir {
				walk(p)
			}
		}
	}
	walk("")
	return out, ghosts
}

// stackTree reads the merged view through Resolve and ReadDir.
func stackTree(t testing.TB, s *Stack) tree {
	t.Helper()
	out := tree{}
	var walk func(rel string)
	walk = func(rel string) {
		ents, err := s.ReadDir(rel)
		if err != nil {
			t.Fatalf("ReadDir(%q): %v", rel, err)
		}
		for _, e := range ents {
			r, err := s.Resolve(e.Path)
			if err != nil {
				t.Fatalf("Resolve(%q) of a listed entry: %v", e.Path, err)
			}
			if r.Layer != e.Layer || r.RealPath != e.RealPath {
				t.Fatalf("Resolve(%q) = layer %d %q, ReadDir said layer %d %q", e.Path, r.Layer, r.RealPath, e.Layer, e.RealPath)
			}
			n := readNode(t, filepath.Join(e.LayerDir, e.RealPath), s.isPrivateXattr)
			if e.Metacopy {
				n.Sum = readNode(t, filepath.Join(s.layers[e.DataLayer], e.DataPath), nil).Sum
			}
			if n.Kind != e.Kind || n.Mode != e.Stat.Mode&0o7777 && e.Kind != KindSymlink {
				t.Fatalf("entry %q: stat in Entry disagrees with the real file", e.Path)
			}
			out[e.Path] = n
			if e.Kind == KindDir {
				walk(e.Path)
			}
		}
	}
	walk("")
	return out
}

// compareTrees reports every difference; checkMtime also compares mtimes
// (of entries not listed in noTime).
func compareTrees(t testing.TB, what string, want, got tree, checkMtime bool, noTime map[string]bool) {
	t.Helper()
	var keys []string
	for k := range want {
		keys = append(keys, k)
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	bad := 0
	for _, k := range keys {
		w, wok := want[k]
		g, gok := got[k]
		switch {
		case !wok:
			t.Errorf("%s: %q extra: %s", what, k, g)
		case !gok:
			t.Errorf("%s: %q missing, want %s", what, k, w)
		default:
			wt, gt := w.Mtime, g.Mtime
			w.Mtime, g.Mtime = unix.Timespec{}, unix.Timespec{}
			w.Ino, g.Ino, w.Dev, g.Dev = 0, 0, 0, 0
			if w != g {
				t.Errorf("%s: %q differs:\n want %s\n  got %s", what, k, w, g)
			} else if checkMtime && !noTime[k] && wt != gt {
				t.Errorf("%s: %q mtime %v, want %v", what, k, gt, wt)
			} else {
				continue
			}
		}
		if bad++; bad > 20 {
			t.Fatalf("%s: too many differences", what)
		}
	}
}

// mountOverlay mounts lowers (top first) with an optional upper and
// returns the merged dir, unmounted at the end of the test.
func mountOverlay(t testing.TB, upper string, lowers []string, extra string) string {
	t.Helper()
	base := filepath.Dir(lowers[0])
	merged, err := os.MkdirTemp(base, "merged")
	if err != nil {
		t.Fatal(err)
	}
	opts := "lowerdir=" + strings.Join(lowers, ":")
	if upper != "" {
		work, err := os.MkdirTemp(base, "work")
		if err != nil {
			t.Fatal(err)
		}
		opts += ",upperdir=" + upper + ",workdir=" + work
	}
	if extra != "" {
		opts += "," + extra
	}
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, 0); err != nil {
			_ = unix.Unmount(merged, unix.MNT_DETACH)
		}
	})
	return merged
}

func unmountOverlay(t testing.TB, merged string) {
	t.Helper()
	if err := unix.Unmount(merged, 0); err != nil {
		t.Fatalf("unmount %s: %v", merged, err)
	}
}

func mustWrite(t testing.TB, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func mustMkdir(t testing.TB, p string) {
	t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
}

func mustXattr(t testing.TB, p, name, value string) {
	t.Helper()
	if err := unix.Lsetxattr(p, name, []byte(value), 0); err != nil {
		t.Fatalf("setxattr %s %s: %v", p, name, err)
	}
}

func mustWhiteout(t testing.TB, p string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	// Mode 0, as the kernel makes them.
	if err := unix.Mknod(p, unix.S_IFCHR, 0); err != nil {
		t.Fatalf("mknod whiteout %s: %v", p, err)
	}
}

func readFile(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func needRoot(t testing.TB) {
	if os.Geteuid() != 0 {
		require.Skip(t, "needs root for mounts, whiteouts and trusted xattrs")
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if fuzzBase != "" {
		os.RemoveAll(fuzzBase)
	}
	os.Exit(code)
}
