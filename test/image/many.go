package image

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// BuildMany writes to layout an image of nLayers layers of filesPerLayer small
// files each, spread over directories of 100: an image whose removal costs
// what a real one's does, one unlink per file, where the test image's
// removal is a few big extents. It has no entrypoint and is never run.
func BuildMany(layout, name string, nLayers, filesPerLayer int) (*Image, error) {
	img := &Image{Dir: layout, Name: name}
	if err := os.MkdirAll(filepath.Join(layout, "blobs", "sha256"), 0o755); err != nil {
		return nil, err
	}
	for i := range nLayers {
		l := layer{gzip: true}
		top := fmt.Sprintf("layer%d", i)
		l.files = append(l.files, dir(top, 0o755))
		for f := range filesPerLayer {
			d := fmt.Sprintf("%s/d%d", top, f/100)
			if f%100 == 0 {
				l.files = append(l.files, dir(d, 0o755))
			}
			l.files = append(l.files, reg(fmt.Sprintf("%s/f%d", d, f), 0o644, []byte(fmt.Sprintf("layer %d file %d\n", i, f))))
		}
		desc, diffID, err := img.writeLayer(l)
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i+1, err)
		}
		img.Layers = append(img.Layers, desc)
		img.DiffIDs = append(img.DiffIDs, diffID)
	}
	platform := ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH}
	config := ocispec.Image{
		Platform: platform,
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: img.DiffIDs},
	}
	configDesc, err := img.writeJSON(ocispec.MediaTypeImageConfig, config)
	if err != nil {
		return nil, err
	}
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    img.Layers,
	}
	if img.Manifest, err = img.writeJSON(ocispec.MediaTypeImageManifest, manifest); err != nil {
		return nil, err
	}
	img.Manifest.Platform = &platform
	img.Manifest.Annotations = map[string]string{
		ocispec.AnnotationRefName:  name,
		"io.containerd.image.name": name,
	}
	index := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{img.Manifest},
	}
	if err := writeJSONFile(filepath.Join(layout, ocispec.ImageIndexFile), index); err != nil {
		return nil, err
	}
	return img, writeJSONFile(filepath.Join(layout, ocispec.ImageLayoutFile), ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
}
