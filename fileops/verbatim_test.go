package fileops

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
)

// TestVerbatim: with WithVerbatim a layer is a plain directory. What
// overlay would read as a whiteout, an opaque dir or private metadata is
// content, and Flatten copies it as it is.
func TestVerbatim(t *testing.T) {
	base := loopfs.Mount(t, loopfs.XFS)
	layer := filepath.Join(base, "layer")
	if err := os.MkdirAll(filepath.Join(layer, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(layer, "zero-dev"), unix.S_IFCHR|0o600, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(filepath.Join(layer, "dir"), "trusted.overlay.opaque", []byte("y"), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(layer, ".wh.file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}

	plain, err := NewStack("", []string{layer}, WithVerbatim(), WithTarWhiteouts())
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(base, "copy")
	if _, err := Flatten(context.Background(), plain, dst); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(dst, "zero-dev"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("the 0/0 device was not copied as a device: %v %+v", err, st)
	}
	if _, err := os.Lstat(filepath.Join(dst, ".wh.file")); err != nil {
		t.Errorf("a .wh. name is a plain file here: %v", err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Getxattr(filepath.Join(dst, "dir"), "trusted.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("trusted.overlay.opaque is data here and must be copied: %q %v", buf[:n], err)
	}

	// Without it, the same layer reads as overlay does.
	overlay, err := NewStack("", []string{layer})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := overlay.Resolve("/zero-dev"); err == nil {
		t.Error("without WithVerbatim a 0/0 device is a whiteout")
	}
}
