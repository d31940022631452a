package fileops

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
)

// TestKernelOracle generates layer stacks, mounts them with the kernel's
// overlayfs and compares what the kernel shows with Resolve/ReadDir and
// with Flatten's output; then writes through the mount and through CopyUp
// into a copy of the upper and compares the two uppers.
//
// The kernel is inconsistent about xattr whiteouts in the upper and in
// lower dirs not marked opaque=x (or in the bottom layer): stat hides the
// name but readdir lists it. fileops hides it from both; the oracle drops
// such "ghost" names from the kernel's listing and checks that Resolve
// says they do not exist.
func TestKernelOracle(t *testing.T) {
	needRoot(t)
	mnt := loopfs.Mount(t, loopfs.XFS)
	type variant struct {
		name   string
		opts   []StackOpt
		mount  string
		gen    genOpts
		seeds  int
		layers int
	}
	variants := []variant{
		{"trusted", nil, "redirect_dir=on,index=off,metacopy=off", genOpts{prefix: "trusted.overlay.", redirects: true, ops: 40}, 40, 6},
		{"userxattr", []StackOpt{WithUserXattr()}, "userxattr", genOpts{prefix: "user.overlay.", ops: 40}, 12, 4},
	}
	for _, vr := range variants {
		for seed := int64(1); seed <= int64(vr.seeds); seed++ {
			t.Run(fmt.Sprintf("%s/seed%d", vr.name, seed), func(t *testing.T) {
				base, err := os.MkdirTemp(mnt, "oracle")
				if err != nil {
					t.Fatal(err)
				}
				layers := newLayers(t, base, vr.layers)
				genStack(t, seed*7919, layers, vr.gen)
				top := topFirst(layers)
				upper, lowers := top[0], top[1:]
				upperB := filepath.Join(base, "upperB")
				if out, err := exec.Command("cp", "-a", upper, upperB).CombinedOutput(); err != nil {
					t.Fatalf("cp -a: %v: %s", err, out)
				}
				merged := mountOverlay(t, upper, lowers, vr.mount)
				want, ghosts := walkTree(t, merged, skipOverlayXattrs)

				s, err := NewStack(upper, lowers, vr.opts...)
				if err != nil {
					t.Fatal(err)
				}
				got := stackTree(t, s)
				redirected := 0
				for p := range got {
					if e, err := s.Resolve(p); err == nil && e.RealPath != p {
						redirected++
					}
				}
				t.Logf("%d entries (%d through a redirect), %d xattr-whiteout ghosts", len(want), redirected, len(ghosts))
				compareTrees(t, "Resolve/ReadDir vs kernel", want, got, true, nil)
				for _, g := range ghosts {
					if _, err := s.Resolve(g); !errors.Is(err, fs.ErrNotExist) {
						t.Errorf("xattr whiteout %q (listed by the kernel's readdir, hidden by its stat): Resolve err %v, want ErrNotExist", g, err)
					}
				}

				flat := filepath.Join(base, "flat")
				fst, err := Flatten(context.Background(), s, flat)
				if err != nil {
					t.Fatal(err)
				}
				if fst.Reflinked != fst.Bytes || fst.Files == 0 {
					t.Errorf("Flatten on xfs reflinked %d of %d bytes (%d files)", fst.Reflinked, fst.Bytes, fst.Files)
				}
				flatTree, _ := walkTree(t, flat, skipOverlayXattrs)
				compareTrees(t, "Flatten vs kernel", want, flatTree, true, nil)
				checkLinkGroups(t, want, flatTree)

				// Writes: the kernel on upper, fileops on upperB.
				sB, err := NewStack(upperB, lowers, vr.opts...)
				if err != nil {
					t.Fatal(err)
				}
				var cands []string
				for p := range got {
					e, err := s.Resolve(p)
					if err == nil && e.Kind == KindFile && e.Layer > 0 && e.Stat.Nlink == 1 {
						cands = append(cands, p)
					}
				}
				sort.Strings(cands)
				noTime := map[string]bool{}
				for i, p := range cands {
					if i >= 8 {
						break
					}
					kp, up := filepath.Join(merged, p), filepath.Join(upperB, p)
					if _, err := sB.CopyUp(context.Background(), p); err != nil {
						t.Fatalf("CopyUp(%q): %v", p, err)
					}
					switch i % 4 {
					case 0:
						for _, f := range []string{kp, up} {
							fh, err := os.OpenFile(f, os.O_WRONLY|os.O_APPEND, 0)
							if err != nil {
								t.Fatal(err)
							}
							fh.WriteString("appended")
							fh.Close()
						}
						noTime[p] = true
					case 1:
						for _, f := range []string{kp, up} {
							if err := os.Chmod(f, 0o751); err != nil {
								t.Fatal(err)
							}
						}
					case 2:
						for _, f := range []string{kp, up} {
							if err := os.Truncate(f, 100); err != nil {
								t.Fatal(err)
							}
						}
						noTime[p] = true
					case 3:
						if err := os.Rename(kp, kp+".renamed"); err != nil {
							t.Fatal(err)
						}
						if err := os.Rename(up, up+".renamed"); err != nil {
							t.Fatal(err)
						}
						mustWhiteout(t, up)
						dir, _ := parentName(p)
						noTime[dir] = true
						noTime[p] = true
						noTime[p+".renamed"] = true
					}
				}
				unmountOverlay(t, merged)
				ua, _ := walkTree(t, upper, skipOverlayXattrs)
				ub, _ := walkTree(t, upperB, skipOverlayXattrs)
				compareTrees(t, "upper after kernel writes vs upper after CopyUp", ua, ub, true, noTime)
			})
		}
	}
}

// checkLinkGroups checks that names sharing an inode in want share one in got.
func checkLinkGroups(t *testing.T, want, got tree) {
	t.Helper()
	first := map[[2]uint64]string{}
	for _, p := range sortedKeys(want) {
		w := want[p]
		if w.Kind != KindFile {
			continue
		}
		k := [2]uint64{w.Dev, w.Ino}
		if f, ok := first[k]; ok {
			if got[f].Ino != got[p].Ino {
				t.Errorf("%q and %q are one inode in the kernel's view, two in the copy", f, p)
			}
			continue
		}
		first[k] = p
	}
}

func sortedKeys(tr tree) []string {
	var out []string
	for k := range tr {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
