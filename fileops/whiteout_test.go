package fileops

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// TestXattrWhiteoutInconsistency pins down the kernel's split behaviour
// for xattr whiteouts (NOTES.md) and what fileops does instead. The kernel
// hides such a name from stat everywhere, but its readdir drops it only in
// a lower dir marked opaque=x that is not the bottom layer; in the upper,
// in an unmarked dir or in the bottom layer readdir still lists it.
// fileops follows stat: the name is hidden from Resolve and ReadDir alike.
func TestXattrWhiteoutInconsistency(t *testing.T) {
	needRoot(t)
	mnt := loopfs.Mount(t, loopfs.XFS)
	layers := newLayers(t, filepath.Join(mnt, "layers"), 3) // bottom, middle, upper
	bottom, middle, upper := layers[0], layers[1], layers[2]
	xw := func(dir, name string, mark bool) {
		p := filepath.Join(dir, name)
		mustWrite(t, p, nil, 0o644)
		mustXattr(t, p, "trusted.overlay.whiteout", "")
		if mark {
			mustXattr(t, filepath.Dir(p), "trusted.overlay.opaque", "x")
		}
	}
	for _, p := range []string{"marked/y", "unmarked/z", "up/x", "upmarked/q"} {
		mustWrite(t, filepath.Join(bottom, p), []byte("hidden data"), 0o644)
	}
	xw(bottom, "bot/w", true)
	xw(middle, "marked/y", true)
	xw(middle, "unmarked/z", false)
	xw(upper, "up/x", false)
	xw(upper, "upmarked/q", true)
	merged := mountOverlay(t, upper, []string{middle, bottom}, "")
	s, err := NewStack(upper, []string{middle, bottom})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path       string
		consistent bool // the kernel's readdir hides it too
	}{
		{"marked/y", true},
		{"unmarked/z", false},
		{"up/x", false},
		{"upmarked/q", false},
		{"bot/w", false},
	} {
		_, statErr := os.Lstat(filepath.Join(merged, c.path))
		ents, err := os.ReadDir(filepath.Join(merged, filepath.Dir(c.path)))
		if err != nil {
			t.Fatal(err)
		}
		listed := false
		for _, e := range ents {
			listed = listed || e.Name() == filepath.Base(c.path)
		}
		t.Logf("kernel: %s stat hidden=%v, listed by readdir=%v", c.path, errors.Is(statErr, fs.ErrNotExist), listed)
		if !errors.Is(statErr, fs.ErrNotExist) {
			t.Errorf("kernel stat found %s", c.path)
		}
		if c.consistent && listed {
			t.Errorf("kernel readdir lists %s in a marked middle dir", c.path)
		}
		if _, err := s.Resolve(c.path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Resolve(%s): %v, want ErrNotExist", c.path, err)
		}
		fents, err := s.ReadDir(filepath.Dir(c.path))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range fents {
			if e.Path == c.path {
				t.Errorf("ReadDir lists %s", c.path)
			}
		}
	}
}

// TestConcurrentCopyUp races copy-ups of one file and of siblings sharing
// parents; run with -race.
func TestConcurrentCopyUp(t *testing.T) {
	needRoot(t)
	mnt := loopfs.Mount(t, loopfs.XFS)
	lower, upper := filepath.Join(mnt, "lower"), filepath.Join(mnt, "upper")
	mustMkdir(t, upper)
	names := []string{"p/q/a", "p/q/b", "p/r/c", "p/q/a", "p/q/a", "p/d"}
	for _, n := range names {
		mustWrite(t, filepath.Join(lower, n), []byte(n), 0o644)
	}
	s, err := NewStack(upper, []string{lower})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(names)*2)
	for _, n := range names {
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, err := s.CopyUp(context.Background(), n)
			errs <- err
		}()
		go func() {
			defer wg.Done()
			_, err := s.CopyRange(context.Background(), n, 0, n, 100, 1)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for _, n := range names {
		if b := readFile(t, filepath.Join(upper, n)); string(b[:len(n)]) != n {
			t.Errorf("%s reads %q", n, b)
		}
	}
}

// TestRedirectNoFollow checks redirects against the kernel with
// redirect_dir=on, =nofollow and userxattr (which implies nofollow): the
// kernel refuses (EPERM) a lookup that meets a redirect it may not follow,
// in the upper or in a middle layer, and ignores one in the bottom layer.
func TestRedirectNoFollow(t *testing.T) {
	needRoot(t)
	for _, c := range []struct {
		mount  string
		opts   []StackOpt
		follow bool
	}{
		{"redirect_dir=on", nil, true},
		{"redirect_dir=nofollow", []StackOpt{WithoutRedirects()}, false},
		{"userxattr", []StackOpt{WithUserXattr()}, false},
	} {
		t.Run(c.mount, func(t *testing.T) {
			mnt := loopfs.Mount(t, loopfs.Tmpfs)
			layers := newLayers(t, mnt, 3) // bottom, middle, upper
			bottom, middle, upper := layers[0], layers[1], layers[2]
			mustWrite(t, filepath.Join(bottom, "a/f"), []byte("f"), 0o644)
			mustWrite(t, filepath.Join(middle, "r/g"), []byte("g"), 0o644)
			mustWhiteout(t, filepath.Join(middle, "a"))
			mustWrite(t, filepath.Join(upper, "u/h"), []byte("h"), 0o644)
			mustWrite(t, filepath.Join(bottom, "x/i"), []byte("i"), 0o644)
			mustMkdir(t, filepath.Join(middle, "x"))
			for _, ns := range []string{"trusted.overlay.", "user.overlay."} {
				mustXattr(t, filepath.Join(middle, "r"), ns+"redirect", "a")
				mustXattr(t, filepath.Join(upper, "u"), ns+"redirect", "/a")
				mustXattr(t, filepath.Join(bottom, "x"), ns+"redirect", "/a")
			}
			merged := mountOverlay(t, upper, []string{middle, bottom}, c.mount)
			s, err := NewStack(upper, []string{middle, bottom}, c.opts...)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"r", "u", "x"} {
				kents, kerr := os.ReadDir(filepath.Join(merged, p))
				fents, ferr := s.ReadDir(p)
				if (kerr != nil) != (ferr != nil) || (kerr != nil && !errors.Is(ferr, unix.EPERM)) {
					t.Errorf("%s: kernel %v, fileops %v", p, kerr, ferr)
					continue
				}
				var kn, fn []string
				for _, e := range kents {
					kn = append(kn, e.Name())
				}
				for _, e := range fents {
					fn = append(fn, e.Info.Name())
				}
				if sprint(kn) != sprint(fn) {
					t.Errorf("%s: kernel lists %v, fileops %v", p, kn, fn)
				}
			}
		})
	}
}
