package image

import (
	"archive/tar"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/image/view"
)

// TestBuild checks the layout and that Go's tar reader (the one containerd's
// applier uses) reads every layer, the hand-written sparse entry included,
// with the contents the model expects.
func TestBuild(t *testing.T) {
	dir := t.TempDir()
	img, err := Build(filepath.Join(dir, "layout"), "overclone.test/e2e:1", []byte("not a binary"))
	if err != nil {
		t.Fatal(err)
	}
	if len(img.Layers) != 4 || len(img.ChainIDs()) != 4 || img.ChainIDs()[0] != img.DiffIDs[0] {
		t.Fatalf("layers %d, chain ids %v", len(img.Layers), img.ChainIDs())
	}
	for _, want := range []string{
		"opaque/new.txt f 0644",
		"deleted-dir d 0700",
		"deleted-dir/fresh.txt f",
		"dir-to-file f 0644",
		"replaced d 0750",
		"replaced/inside.txt f",
		"hard/b f 0644 0:0 size=21",
		"hardlink=hard/a",
		"caps/ping f 0755 0:0 size=13",
		"cap=0100000200200000",
		"owned.txt f 0640 1000:1001",
		"setuid f 4755",
		"sticky d 1777",
		"link l 0000 0:0 -> keep.txt",
		"big f 0644 0:0 size=67108864",
		"sparse f 0644 0:0 size=16777216",
	} {
		if !strings.Contains(img.Expected, want) {
			t.Errorf("expected view lacks %q", want)
		}
	}
	for _, gone := range []string{"deleted.txt", "old.txt", "opaque/lower.txt", "opaque/sub", "dir-to-file/child"} {
		if strings.Contains(img.Expected, gone) {
			t.Errorf("expected view has %q", gone)
		}
	}

	sparseDigest := ""
	for _, line := range strings.Split(img.Expected, "\n") {
		if strings.HasPrefix(line, "sparse ") {
			sparseDigest = line[strings.Index(line, "sha256=")+7:]
		}
	}
	found := false
	for _, l := range img.Layers {
		f, err := os.Open(img.blobPath(l.Digest))
		if err != nil {
			t.Fatal(err)
		}
		var r io.Reader = f
		if strings.HasSuffix(l.MediaType, "gzip") {
			if r, err = gzip.NewReader(f); err != nil {
				t.Fatal(err)
			}
		}
		tr := tar.NewReader(r)
		for {
			hdr, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("layer %s: %v", l.Digest, err)
			}
			if hdr.Name == SparseFile {
				found = true
				d, err := view.Digest(tr)
				if err != nil {
					t.Fatal(err)
				}
				if hdr.Size != SparseSize || d != sparseDigest {
					t.Errorf("sparse entry: size %d digest %s, want %d %s", hdr.Size, d, SparseSize, sparseDigest)
				}
			}
			if strings.Contains(hdr.Name, "GNUSparseFile") {
				t.Errorf("tar reader did not resolve the sparse entry: %s", hdr.Name)
			}
		}
		f.Close()
	}
	if !found {
		t.Error("no sparse entry read")
	}
	if err := img.WriteArchive(filepath.Join(dir, "image.tar")); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + img.Expected)
}
