package nodeimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/hack/ocilayout"
)

// TestBuildReproducible builds the image twice from scratch dirs of
// different names and compares the archives byte for byte.
func TestBuildReproducible(t *testing.T) {
	if testing.Short() {
		t.Skip("builds both binaries twice")
	}
	dir := t.TempDir()
	var archives [2][]byte
	var results [2]*Result
	for i, work := range []string{"a", "somewhere-else"} {
		opts := Options{RepoRoot: "../..", Arch: runtime.GOARCH, Work: filepath.Join(dir, work)}
		out := filepath.Join(dir, work+".tar")
		res, err := Build(opts, out)
		if err != nil {
			t.Fatal(err)
		}
		results[i] = res
		if archives[i], err = os.ReadFile(out); err != nil {
			t.Fatal(err)
		}
	}
	if results[0].Manifest.Digest != results[1].Manifest.Digest || !bytes.Equal(archives[0], archives[1]) {
		t.Fatalf("two builds differ: %s (%d bytes) and %s (%d bytes)",
			results[0].Manifest.Digest, len(archives[0]), results[1].Manifest.Digest, len(archives[1]))
	}
	t.Logf("%s %s, %d bytes", results[0].Name, results[0].Manifest.Digest, results[0].Size)
	checkContents(t, archives[0])
}

// checkContents reads the archive as an importer would (index, manifest,
// config, layer) and checks what the DaemonSet relies on: both binaries,
// executable and static, and the mount point dirs.
func checkContents(t *testing.T, archive []byte) {
	t.Helper()
	blobs := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Uid != 0 || hdr.Gid != 0 || !hdr.ModTime.Equal(ocilayout.Epoch) {
			t.Errorf("archive entry %s: owner %d:%d, mtime %s", hdr.Name, hdr.Uid, hdr.Gid, hdr.ModTime)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		blobs[hdr.Name] = b
	}
	var index ocispec.Index
	mustJSON(t, blobs["index.json"], &index)
	if len(index.Manifests) != 1 || index.Manifests[0].Annotations[ocispec.AnnotationRefName] != DefaultName {
		t.Fatalf("index: %+v", index)
	}
	blob := func(d digest.Digest) []byte {
		b, ok := blobs["blobs/sha256/"+d.Encoded()]
		if !ok || digest.FromBytes(b) != d {
			t.Fatalf("blob %s missing or wrong", d)
		}
		return b
	}
	var manifest ocispec.Manifest
	mustJSON(t, blob(index.Manifests[0].Digest), &manifest)
	var cfg ocispec.Image
	mustJSON(t, blob(manifest.Config.Digest), &cfg)
	if len(manifest.Layers) != 1 || cfg.Config.Entrypoint[0] != "/usr/local/bin/"+Daemon || cfg.Created != nil {
		t.Fatalf("manifest %+v, config %+v", manifest, cfg)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob(manifest.Layers[0].Digest)))
	if err != nil {
		t.Fatal(err)
	}
	if zr.Name != "" || !zr.ModTime.IsZero() {
		t.Errorf("gzip header names %q, mtime %s", zr.Name, zr.ModTime)
	}
	files := map[string]*tar.Header{}
	contents := map[string][]byte{}
	lr := tar.NewReader(zr)
	prev := ""
	for {
		hdr, err := lr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		name := "/" + strings.TrimSuffix(hdr.Name, "/")
		if name <= prev {
			t.Errorf("layer entries not sorted: %s after %s", name, prev)
		}
		prev = name
		files[name] = hdr
		if contents[name], err = io.ReadAll(lr); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{filepath.Dir(config.DefaultPath), filepath.Dir(config.DefaultAddress), config.DefaultRoot} {
		if h := files[d]; h == nil || h.Typeflag != tar.TypeDir {
			t.Errorf("image lacks dir %s", d)
		}
	}
	for _, name := range []string{Daemon, CLI} {
		p := filepath.Join(BinDir, name)
		h := files[p]
		if h == nil || h.Typeflag != tar.TypeReg || h.Mode != 0o755 {
			t.Errorf("%s: %+v", p, h)
			continue
		}
		f, err := elf.NewFile(bytes.NewReader(contents[p]))
		if err != nil {
			t.Errorf("%s: %v", p, err)
			continue
		}
		// A dynamically linked binary names its loader in PT_INTERP;
		// the image has no loader and no libc for it.
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				t.Errorf("%s has an interpreter: not static", p)
			}
		}
		if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
			t.Errorf("%s needs %v", p, libs)
		}
	}
	if len(files) != 2+10 {
		var names []string
		for n := range files {
			names = append(names, n)
		}
		t.Errorf("image holds %d entries, want the 2 binaries and 10 dirs: %v", len(files), names)
	}
}

func mustJSON(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}
