package nodeimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/hack/ocilayout"
	"github.com/overclone/overclone/test/require"
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
	files, contents := checkContents(t, archives[0])
	t.Run("mkfs.ext4", func(t *testing.T) { formatInImage(t, files, contents) })
}

// formatInImage unpacks the image's files into a dir and runs mkfs.ext4
// chrooted there, as the containerized daemon does for a size limit: it
// runs on what the image holds alone, and makes an ext4 with the
// features the host's mkfs.ext4 gives.
func formatInImage(t *testing.T, files map[string]*tar.Header, contents map[string][]byte) {
	require.Root(t, "chroot into the unpacked image")
	root := t.TempDir()
	for name, h := range files {
		p := filepath.Join(root, name)
		var err error
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, 0o755)
		case tar.TypeSymlink:
			os.MkdirAll(filepath.Dir(p), 0o755)
			err = os.Symlink(h.Linkname, p)
		default:
			os.MkdirAll(filepath.Dir(p), 0o755)
			err = os.WriteFile(p, contents[name], os.FileMode(h.Mode))
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	features := func(img string) string {
		t.Helper()
		out, err := exec.Command("dumpe2fs", "-h", img).Output()
		if err != nil {
			t.Fatalf("dumpe2fs %s: %v", img, err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if f, ok := strings.CutPrefix(line, "Filesystem features:"); ok {
				return strings.TrimSpace(f)
			}
		}
		t.Fatalf("dumpe2fs %s: no features in %s", img, out)
		return ""
	}
	const size = 64 << 20
	args := []string{"-q", "-F", "-J", "size=4", "-E", "lazy_itable_init=1,lazy_journal_init=1"}
	inImage, onHost := filepath.Join(root, "in-image"), filepath.Join(t.TempDir(), "on-host")
	for _, img := range []string{inImage, onHost} {
		if err := os.WriteFile(img, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, size); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(filepath.Join(ToolDir, "mkfs.ext4"), append(args, "/in-image")...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root}
	cmd.Env = []string{} // nothing of the host's environment
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 in the image: %v: %s", err, out)
	}
	if out, err := exec.Command("mkfs.ext4", append(args, onHost)...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 on the host: %v: %s", err, out)
	}
	if in, host := features(inImage), features(onHost); in != host || !strings.Contains(in, "extent") {
		t.Fatalf("ext4 made in the image has features %q; on the host %q", in, host)
	}
}

// checkContents reads the archive as an importer would (index, manifest,
// config, layer) and checks what the DaemonSet relies on: both binaries,
// executable and static, and the mount point dirs.
func checkContents(t *testing.T, archive []byte) (map[string]*tar.Header, map[string][]byte) {
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
	// Besides dirs and the binaries, mke2fs and what it loads, exactly
	// as the build host has them, and nothing else.
	tools, err := hostMke2fs(runtime.GOARCH)
	if err != nil {
		t.Fatal(err)
	}
	for name, h := range files {
		tool, isTool := tools[name]
		switch {
		case h.Typeflag == tar.TypeDir, name == filepath.Join(BinDir, Daemon), name == filepath.Join(BinDir, CLI):
		case !isTool:
			t.Errorf("image holds %s, neither a dir, a binary nor part of mke2fs", name)
		case tool.link != h.Linkname || !bytes.Equal(tool.data, contents[name]) || tool.mode != h.Mode:
			t.Errorf("image's %s differs from the host's", name)
		}
	}
	for name := range tools {
		if files[name] == nil {
			t.Errorf("image lacks %s", name)
		}
	}
	if !slices.Contains(cfg.Config.Env, "PATH="+BinDir+":"+ToolDir) {
		t.Errorf("image's environment %v: mkfs.ext4 is not on its PATH", cfg.Config.Env)
	}
	return files, contents
}

func mustJSON(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}
