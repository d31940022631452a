// Package ocilayout writes OCI image layouts and the tar archives of them
// that `ctr images import` reads (containerd 1.6 and 2.x alike). Both images
// the repository builds go through it: the e2e suite's test image
// (test/image) and the node image the DaemonSet runs (hack/nodeimage).
//
// Everything it writes is a function of its input only: gzip headers carry
// no name and no mtime, archive entries are sorted and owned by 0:0 with one
// fixed mtime and fixed modes, so the same image gives the same bytes on any
// machine, under any umask. It never talks to containerd or a registry.
package ocilayout

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
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Epoch is the mtime of every archive entry: a constant, so that the
// archive does not change with the time it was written.
var Epoch = time.Unix(1700000000, 0)

// Layout is an OCI image layout being written under Dir.
type Layout struct{ Dir string }

// New creates the layout's blob dir under dir (created if missing).
func New(dir string) (*Layout, error) {
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return nil, err
	}
	return &Layout{Dir: dir}, nil
}

// WriteLayer stores the uncompressed tar stream that write produces as a
// layer blob, gzip'd when gz is set, and returns the blob's descriptor and
// the layer's diff ID (the digest of the uncompressed stream).
func (l *Layout) WriteLayer(gz bool, write func(io.Writer) error) (ocispec.Descriptor, digest.Digest, error) {
	tmp, err := os.CreateTemp(filepath.Join(l.Dir, "blobs"), "layer-")
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()

	blobHash, diffHash := sha256.New(), sha256.New()
	blob := &countingWriter{w: io.MultiWriter(tmp, blobHash)}
	mediaType := ocispec.MediaTypeImageLayer
	var tarOut io.Writer = io.MultiWriter(blob, diffHash)
	var zw *gzip.Writer
	if gz {
		mediaType = ocispec.MediaTypeImageLayerGzip
		// A zero gzip.Header: no file name, mtime 0, so the blob's
		// digest depends on the layer's content alone.
		zw = gzip.NewWriter(blob)
		tarOut = io.MultiWriter(zw, diffHash)
	}
	if err := write(tarOut); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if zw != nil {
		if err := zw.Close(); err != nil {
			return ocispec.Descriptor{}, "", err
		}
	}
	if err := tmp.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	dgst := sum(blobHash)
	if err := os.Rename(tmp.Name(), l.BlobPath(dgst)); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: dgst, Size: blob.n}, sum(diffHash), nil
}

// WriteJSON stores v as a blob of the given media type.
func (l *Layout) WriteJSON(mediaType string, v any) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	dgst := digest.FromBytes(b)
	if err := os.WriteFile(l.BlobPath(dgst), b, 0o644); err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: dgst, Size: int64(len(b))}, nil
}

// WriteImage stores config and a manifest of it and layers, and writes
// index.json naming the manifest name, and the oci-layout file. It returns
// the manifest's descriptor as the index holds it.
func (l *Layout) WriteImage(name string, platform ocispec.Platform, config ocispec.Image, layers []ocispec.Descriptor) (ocispec.Descriptor, error) {
	configDesc, err := l.WriteJSON(ocispec.MediaTypeImageConfig, config)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    layers,
	}
	desc, err := l.WriteJSON(ocispec.MediaTypeImageManifest, manifest)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc.Platform = &platform
	desc.Annotations = map[string]string{
		// The OCI name, for OCI tools. containerd's importer reads it
		// only after the next one, and then runs it through ctr's
		// --base-name/--digests translator.
		ocispec.AnnotationRefName: name,
		// containerd's own annotation, which its importer (1.6 and 2.x)
		// takes as the image's full name as it is.
		"io.containerd.image.name": name,
	}
	index := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{desc},
	}
	if err := writeJSONFile(filepath.Join(l.Dir, ocispec.ImageIndexFile), index); err != nil {
		return ocispec.Descriptor{}, err
	}
	return desc, writeJSONFile(filepath.Join(l.Dir, ocispec.ImageLayoutFile), ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
}

// BlobPath is where the blob d lives in the layout.
func (l *Layout) BlobPath(d digest.Digest) string {
	return filepath.Join(l.Dir, "blobs", d.Algorithm().String(), d.Encoded())
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
// `ctr images import` takes. filepath.Walk visits names in lexical order;
// modes are fixed (0755 dirs, 0644 files) rather than taken from the disk,
// where they would follow the umask of whoever built the layout.
func (l *Layout) WriteArchive(path string) error {
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	defer out.Close()
	tw := tar.NewWriter(out)
	err = filepath.Walk(l.Dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(l.Dir, p)
		if err != nil || rel == "." {
			return err
		}
		hdr := &tar.Header{Name: filepath.ToSlash(rel), ModTime: Epoch, Format: tar.FormatUSTAR}
		switch {
		case fi.IsDir():
			hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeDir, hdr.Name+"/", 0o755
		case fi.Mode().IsRegular():
			hdr.Typeflag, hdr.Mode, hdr.Size = tar.TypeReg, 0o644, fi.Size()
		default:
			return fmt.Errorf("%s: not a file or dir", p)
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeDir {
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
		return fmt.Errorf("archive %s: %w", l.Dir, err)
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return out.Close()
}
