// Package image builds the end-to-end test image: an OCI image layout with
// layers that exercise what a snapshotter must preserve (whiteouts, opaque
// dirs, hard links, symlinks, file capabilities, a sparse file, a 64 MiB
// file, a file replaced by a dir and a dir by a file), the static viewer as
// entrypoint, and the merged view the viewer must print for it.
//
// It writes archives `ctr images import` reads; it never talks to containerd.
package image

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"runtime"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Image is a built image layout on disk.
type Image struct {
	Dir      string // the OCI image layout
	Name     string // the containerd image name the archive carries
	Manifest ocispec.Descriptor
	Layers   []ocispec.Descriptor
	DiffIDs  []digest.Digest
	// Expected is what `viewer view /data` prints in a container of this
	// image.
	Expected string
}

type layer struct {
	gzip  bool
	files []file
}

// Build writes the image layout to dir (created if missing). viewer is the
// static entrypoint binary; name is the image name, e.g.
// "overclone.test/e2e:1".
func Build(dir, name string, viewer []byte) (*Image, error) {
	img := &Image{Dir: dir, Name: name}
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return nil, err
	}
	m := newModel()
	for i, l := range layers(viewer) {
		digests := map[string]string{}
		for _, f := range l.files {
			if f.kind == 'f' {
				d, err := fileDigest(f)
				if err != nil {
					return nil, fmt.Errorf("digest %s: %w", f.path, err)
				}
				digests[f.path] = d
			}
		}
		if err := m.apply(i, l.files, digests); err != nil {
			return nil, err
		}
		desc, diffID, err := img.writeLayer(l)
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i+1, err)
		}
		img.Layers = append(img.Layers, desc)
		img.DiffIDs = append(img.DiffIDs, diffID)
	}
	img.Expected = m.view(DataDir)
	return img, img.finish([]string{"/bin/viewer"}, []string{"view", "/" + DataDir})
}

// PausePath is where BuildPause puts the binary; it is the image's
// entrypoint.
const PausePath = "pause"

// BuildPause writes to dir an image of one layer holding only the static
// binary bin at /pause, its entrypoint: the sandbox image of the CRI tests.
func BuildPause(dir, name string, bin []byte) (*Image, error) {
	img := &Image{Dir: dir, Name: name}
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return nil, err
	}
	desc, diffID, err := img.writeLayer(layer{gzip: true, files: []file{reg(PausePath, 0o755, bin)}})
	if err != nil {
		return nil, err
	}
	img.Layers, img.DiffIDs = []ocispec.Descriptor{desc}, []digest.Digest{diffID}
	return img, img.finish([]string{"/" + PausePath}, nil)
}

// finish writes the config, manifest, index and layout file for the layers
// written so far.
func (img *Image) finish(entrypoint, cmd []string) error {
	platform := ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH}
	config := ocispec.Image{
		Platform: platform,
		Config: ocispec.ImageConfig{
			Entrypoint: entrypoint,
			Cmd:        cmd,
			WorkingDir: "/",
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: img.DiffIDs},
	}
	configDesc, err := img.writeJSON(ocispec.MediaTypeImageConfig, config)
	if err != nil {
		return err
	}
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    img.Layers,
	}
	if img.Manifest, err = img.writeJSON(ocispec.MediaTypeImageManifest, manifest); err != nil {
		return err
	}
	img.Manifest.Platform = &platform
	img.Manifest.Annotations = map[string]string{
		ocispec.AnnotationRefName: img.Name,
		// containerd's importer names the image after this one.
		"io.containerd.image.name": img.Name,
	}
	index := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{img.Manifest},
	}
	if err := writeJSONFile(filepath.Join(img.Dir, ocispec.ImageIndexFile), index); err != nil {
		return err
	}
	return writeJSONFile(filepath.Join(img.Dir, ocispec.ImageLayoutFile), ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
}

// ChainIDs returns the snapshot names containerd commits the layers as,
// bottom first: chain(1) = diffID(1), chain(n) = sha256(chain(n-1) + " " + diffID(n)).
func (img *Image) ChainIDs() []digest.Digest {
	ids := make([]digest.Digest, len(img.DiffIDs))
	for i, d := range img.DiffIDs {
		if i == 0 {
			ids[i] = d
			continue
		}
		ids[i] = digest.FromString(ids[i-1].String() + " " + d.String())
	}
	return ids
}

// writeLayer writes l as a blob and returns its descriptor and diff ID.
func (img *Image) writeLayer(l layer) (ocispec.Descriptor, digest.Digest, error) {
	tmp, err := os.CreateTemp(filepath.Join(img.Dir, "blobs"), "layer-")
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()

	blobHash, diffHash := sha256.New(), sha256.New()
	blob := &countingWriter{w: io.MultiWriter(tmp, blobHash)}
	mediaType := ocispec.MediaTypeImageLayer
	var tarOut io.Writer = io.MultiWriter(blob, diffHash)
	var gz *gzip.Writer
	if l.gzip {
		mediaType = ocispec.MediaTypeImageLayerGzip
		gz = gzip.NewWriter(blob)
		tarOut = io.MultiWriter(gz, diffHash)
	}
	if err := writeLayer(tarOut, l.files); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if gz != nil {
		if err := gz.Close(); err != nil {
			return ocispec.Descriptor{}, "", err
		}
	}
	if err := tmp.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	dgst := sum(blobHash)
	if err := os.Rename(tmp.Name(), img.blobPath(dgst)); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: dgst, Size: blob.n}, sum(diffHash), nil
}

func (img *Image) writeJSON(mediaType string, v any) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	dgst := digest.FromBytes(b)
	if err := os.WriteFile(img.blobPath(dgst), b, 0o644); err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: dgst, Size: int64(len(b))}, nil
}

func (img *Image) blobPath(d digest.Digest) string {
	return filepath.Join(img.Dir, "blobs", d.Algorithm().String(), d.Encoded())
}

func writeJSONFile(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

func sum(h hash.Hash) digest.Digest {
	return digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(h.Sum(nil)))
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// WriteArchive writes the layout as one tar file, the form
// `ctr images import` takes.
func (img *Image) WriteArchive(path string) error {
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	defer out.Close()
	tw := tar.NewWriter(out)
	err = filepath.Walk(img.Dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(img.Dir, p)
		if err != nil || rel == "." {
			return err
		}
		hdr, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		hdr.Name, hdr.ModTime = filepath.ToSlash(rel), epoch
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "", ""
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
	if err != nil {
		return fmt.Errorf("archive %s: %w", img.Dir, err)
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return out.Close()
}
