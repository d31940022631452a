package fileops

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/require"
)

// FuzzCleanPath: no input names anything above the root or keeps a NUL.
func FuzzCleanPath(f *testing.F) {
	for _, s := range []string{"", "/", "..", "../../etc/passwd", "a/./b/../c", "a\x00b", "//a//b/", ".../..."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		c, err := cleanPath(p)
		if strings.IndexByte(p, 0) >= 0 {
			if !errors.Is(err, ErrInvalidPath) {
				t.Fatalf("cleanPath(%q) accepted a NUL", p)
			}
			return
		}
		if err != nil {
			t.Fatalf("cleanPath(%q): %v", p, err)
		}
		if strings.HasPrefix(c, "/") || c == "." {
			t.Fatalf("cleanPath(%q) = %q", p, c)
		}
		for _, comp := range splitPath(c) {
			if comp == ".." || comp == "." || comp == "" {
				t.Fatalf("cleanPath(%q) = %q keeps %q", p, c, comp)
			}
		}
		if c2, _ := cleanPath(c); c2 != c {
			t.Fatalf("cleanPath not idempotent: %q -> %q -> %q", p, c, c2)
		}
	})
}

var fuzzStackOnce sync.Once
var fuzzBase string

// fuzzLayers builds, once per process, a stack that tries to lead out of
// its layers, plus an overlay of every kind of whiteout and opaque dir.
func fuzzLayers(t *testing.T) (upper, lower, outside string) {
	fuzzStackOnce.Do(func() {
		dir, err := os.MkdirTemp("", "fileops-fuzz")
		if err != nil {
			t.Fatal(err)
		}
		fuzzBase = dir
		escapeStack(t, dir)
		u, l := filepath.Join(dir, "upper"), filepath.Join(dir, "lower")
		mustWhiteout(t, filepath.Join(u, "d", "f"))
		mustMkdir(t, filepath.Join(u, "opq"))
		mustXattr(t, filepath.Join(u, "opq"), "trusted.overlay.opaque", "y")
		mustWrite(t, filepath.Join(l, "opq", "hidden"), []byte("h"), 0o644)
		mustWrite(t, filepath.Join(u, "d", "sub", "xw"), nil, 0o644)
		mustXattr(t, filepath.Join(u, "d", "sub", "xw"), "trusted.overlay.whiteout", "")
		mustWrite(t, filepath.Join(l, "d", "sub", "xw"), []byte("xw"), 0o644)
	})
	return filepath.Join(fuzzBase, "upper"), filepath.Join(fuzzBase, "lower"), filepath.Join(fuzzBase, "outside")
}

// FuzzResolve resolves arbitrary paths, with an arbitrary redirect set on
// an upper dir: no panic, and every entry found is a real entry inside its
// layer, never the outside canary.
func FuzzResolve(f *testing.F) {
	for _, s := range [][2]string{
		{"esc/canary", "/d"}, {"r/f", "/d"}, {"r/sub/g", "d"}, {"r", "/../outside"},
		{"link/canary", "/link"}, {"r/canary", "/esc"}, {"opq/hidden", "/opq"},
		{"d/sub/xw", "/d/sub"}, {"../../outside/canary", "/"}, {"r\x00", "x"},
		{"up/d/f", "/d"}, {"rel/canary", "/d"}, {"d/loop/", "/d"}, {"up/../esc/", "/"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, p, redirect string) {
		if os.Geteuid() != 0 {
			require.Skip(t, "needs root for trusted xattrs and whiteouts")
		}
		upper, lower, outside := fuzzLayers(t)
		r := filepath.Join(upper, "r")
		if redirect == "" || strings.IndexByte(redirect, 0) >= 0 || len(redirect) > 1024 {
			unix.Lremovexattr(r, "trusted.overlay.redirect")
		} else if err := unix.Lsetxattr(r, "trusted.overlay.redirect", []byte(redirect), 0); err != nil {
			t.Skip(err)
		}
		s, err := NewStack(upper, []string{lower})
		if err != nil {
			t.Fatal(err)
		}
		check := func(e Entry) {
			if c, _ := cleanPath(e.RealPath); c != e.RealPath {
				t.Fatalf("%q resolved to unclean %q", p, e.RealPath)
			}
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(e.LayerDir, e.RealPath), &st); err != nil {
				t.Fatalf("%q resolved to %s/%s: %v", p, e.LayerDir, e.RealPath, err)
			}
			if st.Ino != e.Stat.Ino || st.Dev != e.Stat.Dev {
				t.Fatalf("%q: entry stat is not the stat of %s/%s", p, e.LayerDir, e.RealPath)
			}
			if strings.HasPrefix(filepath.Join(e.LayerDir, e.RealPath), outside) {
				t.Fatalf("%q led outside to %s", p, e.RealPath)
			}
			if strings.Contains(e.Path, "canary") || strings.Contains(e.RealPath, "canary") {
				t.Fatalf("%q found the canary: %+v", p, e)
			}
		}
		if e, err := s.Resolve(p); err == nil {
			check(e)
			if e.Kind == KindDir {
				ents, _ := s.ReadDir(p)
				for _, c := range ents {
					if c.Err == nil {
						check(c)
					}
				}
			}
		}
		// Following links walks their text inside the merged view: what
		// it finds is a real entry inside a layer, and its Path names it.
		if e, err := s.ResolveFollow(p); err == nil {
			check(e)
			if r, err := s.Resolve(e.Path); err != nil || r.Layer != e.Layer || r.RealPath != e.RealPath {
				t.Fatalf("ResolveFollow(%q) = %q, which Resolve finds as %q, %v", p, e.Path, r.RealPath, err)
			}
		}
		if _, err := s.CopyRange(context.Background(), p, 0, p, 1<<20, 1); err == nil {
			// only a visible regular file can be a range source
			if e, err := s.Resolve(p); err != nil || e.Kind != KindFile {
				t.Fatalf("CopyRange on %q succeeded: %v", p, err)
			}
		}
	})
}
