// Package image builds the end-to-end test image: an OCI image layout with
// layers that exercise what a snapshotter must preserve (whiteouts, opaque
// dirs, hard links, symlinks, file capabilities, a sparse file, a 64 MiB
// file, a file replaced by a dir and a dir by a file), the static viewer as
// entrypoint, and the merged view the viewer must print for it.
//
// It writes archives `ctr images import` reads; it never talks to containerd.
package image

import (
	"fmt"
	"io"
	"runtime"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/overclone/overclone/hack/ocilayout"
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
	l, err := ocilayout.New(dir)
	if err != nil {
		return nil, err
	}
	m := newModel()
	for i, ly := range layers(viewer) {
		digests := map[string]string{}
		for _, f := range ly.files {
			if f.kind == 'f' {
				d, err := fileDigest(f)
				if err != nil {
					return nil, fmt.Errorf("digest %s: %w", f.path, err)
				}
				digests[f.path] = d
			}
		}
		if err := m.apply(i, ly.files, digests); err != nil {
			return nil, err
		}
		desc, diffID, err := l.WriteLayer(ly.gzip, func(w io.Writer) error { return writeLayer(w, ly.files) })
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i+1, err)
		}
		img.Layers = append(img.Layers, desc)
		img.DiffIDs = append(img.DiffIDs, diffID)
	}
	img.Expected = m.view(DataDir)

	platform := ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH}
	config := ocispec.Image{
		Platform: platform,
		Config: ocispec.ImageConfig{
			Entrypoint: []string{"/bin/viewer"},
			Cmd:        []string{"view", "/" + DataDir},
			WorkingDir: "/",
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: img.DiffIDs},
	}
	if img.Manifest, err = l.WriteImage(name, platform, config, img.Layers); err != nil {
		return nil, err
	}
	return img, nil
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

func (img *Image) blobPath(d digest.Digest) string {
	return (&ocilayout.Layout{Dir: img.Dir}).BlobPath(d)
}

// WriteArchive writes the layout as one tar file, the form
// `ctr images import` takes.
func (img *Image) WriteArchive(path string) error {
	return (&ocilayout.Layout{Dir: img.Dir}).WriteArchive(path)
}
