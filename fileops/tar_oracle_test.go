package fileops

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// toTarLayer rewrites an overlay-format layer into OCI tar-layer form, the
// reverse of what containerd's applier does: a 0/0 or xattr whiteout NAME
// becomes an empty ".wh.NAME", an opaque dir gets ".wh..wh..opq".
func toTarLayer(t *testing.T, root, prefix string) {
	t.Helper()
	var whiteouts, opaques []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFCHR:
			if st.Rdev == 0 {
				whiteouts = append(whiteouts, p)
			}
		case unix.S_IFREG:
			if _, ok, _ := getXattr(p, prefix+"whiteout"); ok && st.Size == 0 {
				whiteouts = append(whiteouts, p)
			}
		case unix.S_IFDIR:
			if v, ok, _ := getXattr(p, prefix+"opaque"); ok {
				unix.Lremovexattr(p, prefix+"opaque")
				if string(v) == "y" {
					opaques = append(opaques, p)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range whiteouts {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, filepath.Join(filepath.Dir(p), tarWhiteoutPrefix+filepath.Base(p)), nil, 0o644)
	}
	for _, p := range opaques {
		mustWrite(t, filepath.Join(p, tarOpaqueMarker), nil, 0o644)
	}
}

// TestTarOracle: a generated stack in overlay form, mounted by the kernel,
// must look the same as the same stack in OCI tar form read by fileops
// with WithTarWhiteouts.
func TestTarOracle(t *testing.T) {
	needRoot(t)
	mnt := loopfs.Mount(t, loopfs.XFS)
	for seed := int64(1); seed <= 10; seed++ {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			base, err := os.MkdirTemp(mnt, "tar")
			if err != nil {
				t.Fatal(err)
			}
			layers := newLayers(t, filepath.Join(base, "ovl"), 5)
			genStack(t, seed*104729, layers, genOpts{prefix: "trusted.overlay.", ops: 40})
			var tarLayers []string
			for _, l := range layers {
				tl := filepath.Join(base, "tar", filepath.Base(l))
				mustMkdir(t, filepath.Dir(tl))
				if out, err := exec.Command("cp", "-a", l, tl).CombinedOutput(); err != nil {
					t.Fatalf("cp -a: %v: %s", err, out)
				}
				toTarLayer(t, tl, "trusted.overlay.")
				tarLayers = append(tarLayers, tl)
			}
			merged := mountOverlay(t, "", topFirst(layers), "")
			want, _ := walkTree(t, merged, skipOverlayXattrs)
			s, err := NewStack("", topFirst(tarLayers), WithTarWhiteouts())
			if err != nil {
				t.Fatal(err)
			}
			compareTrees(t, "tar layers via fileops vs overlay layers via the kernel", want, stackTree(t, s), false, nil)
		})
	}
}
