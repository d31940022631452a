package fileops

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// TestReadDirBadChild lists a directory holding children the kernel lists
// but cannot stat (an invalid redirect; a redirect under
// redirect_dir=nofollow): ReadDir must list every name the kernel lists,
// fail only those children with the kernel's errno, and Flatten must stop
// naming the bad path.
func TestReadDirBadChild(t *testing.T) {
	needRoot(t)
	for _, k := range testKinds {
		t.Run(string(k), func(t *testing.T) {
			mnt := loopfs.Mount(t, k)
			lower, upper := filepath.Join(mnt, "lower"), filepath.Join(mnt, "upper")
			mustWrite(t, filepath.Join(lower, "good/f"), []byte("f"), 0o644)
			mustWrite(t, filepath.Join(lower, "olddir/x"), []byte("x"), 0o644)
			mustWrite(t, filepath.Join(lower, "bad/y"), []byte("y"), 0o644)
			mustWrite(t, filepath.Join(upper, "z"), []byte("z"), 0o644)
			mustMkdir(t, filepath.Join(upper, "bad"))
			mustXattr(t, filepath.Join(upper, "bad"), "trusted.overlay.redirect", "a/b")
			mustMkdir(t, filepath.Join(upper, "moved"))
			mustXattr(t, filepath.Join(upper, "moved"), "trusted.overlay.redirect", "/olddir")
			mustWhiteout(t, filepath.Join(upper, "olddir"))

			for _, c := range []struct {
				mount string
				opts  []StackOpt
				bad   []string
			}{
				{"redirect_dir=on", nil, []string{"bad"}},
				{"redirect_dir=nofollow", []StackOpt{WithoutRedirects()}, []string{"bad", "moved"}},
			} {
				merged := mountOverlay(t, "", []string{upper, lower}, c.mount)
				s, err := NewStack(upper, []string{lower}, c.opts...)
				if err != nil {
					t.Fatal(err)
				}
				ents, err := s.ReadDir("")
				if err != nil {
					t.Fatalf("%s: ReadDir of a dir with a bad child: %v", c.mount, err)
				}
				kents, err := os.ReadDir(merged)
				if err != nil {
					t.Fatal(err)
				}
				var kn, fn, kbad, fbad []string
				for _, e := range kents {
					kn = append(kn, e.Name())
					if _, err := os.Lstat(filepath.Join(merged, e.Name())); err != nil {
						kbad = append(kbad, e.Name())
						errno := err.(*os.PathError).Err.(unix.Errno)
						for _, fe := range ents {
							if fe.Path == e.Name() && !errors.Is(fe.Err, errno) {
								t.Errorf("%s: %s: kernel stat fails with %v, ReadDir's Err is %v", c.mount, e.Name(), errno, fe.Err)
							}
						}
					}
				}
				for _, e := range ents {
					fn = append(fn, e.Info.Name())
					if e.Err != nil {
						fbad = append(fbad, e.Path)
						if e.Kind != KindUnknown || !strings.Contains(e.Err.Error(), e.Path) {
							t.Errorf("%s: bad entry %+v", c.mount, e)
						}
					}
				}
				sort.Strings(kn)
				if sprint(kn) != sprint(fn) || sprint(kbad) != sprint(fbad) || sprint(fbad) != sprint(c.bad) {
					t.Errorf("%s: kernel lists %v (stat fails: %v), ReadDir %v (Err: %v), want bad %v", c.mount, kn, kbad, fn, fbad, c.bad)
				}
				// Siblings stay readable; Flatten stops at the bad name.
				if _, err := s.CopyOut(context.Background(), "good", filepath.Join(mnt, "good-"+c.mount)); err != nil {
					t.Errorf("%s: CopyOut of a sibling: %v", c.mount, err)
				}
				_, err = Flatten(context.Background(), s, filepath.Join(mnt, "flat-"+c.mount))
				if err == nil || !strings.Contains(err.Error(), "copy out bad:") {
					t.Errorf("%s: Flatten over a bad child: %v, want an error naming bad", c.mount, err)
				}
				unmountOverlay(t, merged)
			}
		})
	}
}
