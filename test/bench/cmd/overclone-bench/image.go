package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"math/rand/v2"
	"path"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/content/local"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// image is the test image: three gzipped tar layers in a local content
// store, generated here (no network for a real Debian minbase). Layer 0
// looks like a minbase rootfs (deep /usr trees, mostly small files, a few
// large ones, symlinks, hard links); layers 1 and 2 add and change files,
// delete some with .wh. whiteouts and replace one directory with an opaque
// one, as package installs do.
type image struct {
	layers  []ocispec.Descriptor
	files   int   // regular files over all layers
	bytes   int64 // their uncompressed size
	applier diff.Applier
}

// fileSize draws a size like a distribution's files: most are small.
func fileSize(rng *rand.Rand) int {
	switch x := rng.IntN(100); {
	case x < 70:
		return 256 + rng.IntN(4<<10)
	case x < 98:
		return 4<<10 + rng.IntN(28<<10)
	default:
		return 32<<10 + rng.IntN(224<<10)
	}
}

// words make file contents compress about as well as binaries and text.
var words = []string{"lib", "usr", "share", "config", "the", "overlay", "snapshot", "\x00\x01\x02", "ELF", "\n", "debian", "0123456789", "{", "}", "=", "value"}

func fileData(rng *rand.Rand, size int) []byte {
	var b bytes.Buffer
	for b.Len() < size {
		if rng.IntN(4) == 0 {
			var raw [16]byte
			for i := range raw {
				raw[i] = byte(rng.Uint32())
			}
			b.Write(raw[:])
		} else {
			b.WriteString(words[rng.IntN(len(words))])
		}
	}
	return b.Bytes()[:size]
}

type layerWriter struct {
	tw      *tar.Writer
	dirs    map[string]bool
	files   int
	bytes   int64
	rng     *rand.Rand
	written map[string]bool
}

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func (w *layerWriter) dir(p string) error {
	if p == "." || p == "/" || w.dirs[p] {
		return nil
	}
	if err := w.dir(path.Dir(p)); err != nil {
		return err
	}
	w.dirs[p] = true
	return w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: 0o755, ModTime: epoch})
}

func (w *layerWriter) file(p string, size int) error {
	if err := w.dir(path.Dir(p)); err != nil {
		return err
	}
	data := fileData(w.rng, size)
	if err := w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: 0o644, Size: int64(size), ModTime: epoch}); err != nil {
		return err
	}
	w.files++
	w.bytes += int64(size)
	w.written[p] = true
	_, err := w.tw.Write(data)
	return err
}

func (w *layerWriter) special(h *tar.Header) error {
	if err := w.dir(path.Dir(h.Name)); err != nil {
		return err
	}
	h.ModTime = epoch
	return w.tw.WriteHeader(h)
}

// genImage writes the three layers into a content store at dir. files is
// the total of regular files; 0.8 of them go to the base layer.
func genImage(ctx context.Context, dir string, files int) (*image, error) {
	cs, err := local.NewStore(dir)
	if err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(8, 8))
	img := &image{applier: apply.NewFileSystemApplier(cs)}
	var base []string // regular files of layer 0, for later layers to change
	plan := []int{files * 8 / 10, files * 15 / 100, files - files*8/10 - files*15/100}
	for li, n := range plan {
		var buf bytes.Buffer
		gz, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
		w := &layerWriter{tw: tar.NewWriter(gz), dirs: map[string]bool{}, rng: rng, written: map[string]bool{}}
		if err := writeLayer(w, li, n, &base); err != nil {
			return nil, fmt.Errorf("layer %d: %w", li, err)
		}
		if err := w.tw.Close(); err != nil {
			return nil, err
		}
		if err := gz.Close(); err != nil {
			return nil, err
		}
		desc := ocispec.Descriptor{
			MediaType: ocispec.MediaTypeImageLayerGzip,
			Digest:    digest.FromBytes(buf.Bytes()),
			Size:      int64(buf.Len()),
		}
		if err := content.WriteBlob(ctx, cs, fmt.Sprintf("layer-%d", li), bytes.NewReader(buf.Bytes()), desc); err != nil {
			return nil, err
		}
		img.layers = append(img.layers, desc)
		img.files += w.files
		img.bytes += w.bytes
	}
	return img, nil
}

func writeLayer(w *layerWriter, li, n int, base *[]string) error {
	rng := w.rng
	if li == 0 {
		for i := 0; i < n; i++ {
			// A few hundred package directories, a few levels deep.
			p := fmt.Sprintf("usr/%s/pkg%03d/sub%d/file%05d", []string{"lib", "share", "bin", "include"}[i%4], rng.IntN(300), rng.IntN(4), i)
			if err := w.file(p, fileSize(rng)); err != nil {
				return err
			}
			*base = append(*base, p)
		}
		for i := 0; i < n/50; i++ {
			if err := w.special(&tar.Header{Typeflag: tar.TypeSymlink, Name: fmt.Sprintf("usr/bin/link%04d", i), Linkname: "../" + (*base)[rng.IntN(len(*base))], Mode: 0o777}); err != nil {
				return err
			}
		}
		for i := 0; i < n/200; i++ {
			if err := w.special(&tar.Header{Typeflag: tar.TypeLink, Name: fmt.Sprintf("usr/lib/hard%04d", i), Linkname: (*base)[i*7%len(*base)]}); err != nil {
				return err
			}
		}
		for i := 0; i < 20; i++ {
			if err := w.file(fmt.Sprintf("etc/opaque-me/old%02d", i), 100); err != nil {
				return err
			}
		}
		return nil
	}
	// Later layers: new files, rewritten files, whiteouts, and in
	// layer 1 an opaque directory.
	for i := 0; i < n; i++ {
		var p string
		if i%3 == 0 {
			p = (*base)[rng.IntN(len(*base))]
		} else {
			p = fmt.Sprintf("opt/layer%d/pkg%03d/file%05d", li, rng.IntN(50), i)
		}
		if err := w.file(p, fileSize(rng)); err != nil {
			return err
		}
	}
	deleted := map[string]bool{}
	for i := 0; i < n/10; i++ {
		p := (*base)[rng.IntN(len(*base))]
		if deleted[p] || w.written[p] {
			continue
		}
		deleted[p] = true
		if err := w.special(&tar.Header{Typeflag: tar.TypeReg, Name: path.Join(path.Dir(p), ".wh."+path.Base(p)), Mode: 0o644}); err != nil {
			return err
		}
	}
	*base = slices.DeleteFunc(*base, func(p string) bool { return deleted[p] })
	if li == 1 {
		if err := w.special(&tar.Header{Typeflag: tar.TypeReg, Name: "etc/opaque-me/.wh..wh..opq", Mode: 0o644}); err != nil {
			return err
		}
		return w.file("etc/opaque-me/new", 100)
	}
	return nil
}

// unpack applies the image onto sn the way containerd's unpacker does:
// per layer Prepare on the previous layer, the diff applier (which writes
// straight into an overlay's upperdir, or mounts anything else and
// unmounts it), then Commit. It returns the top layer's name.
func (img *image) unpack(ctx context.Context, sn snapshots.Snapshotter, prefix string) (string, error) {
	parent := ""
	for i, desc := range img.layers {
		key := fmt.Sprintf("%s-%d-extract", prefix, i)
		mounts, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			return "", fmt.Errorf("prepare layer %d: %w", i, err)
		}
		if _, err := img.applier.Apply(ctx, desc, mounts); err != nil {
			return "", fmt.Errorf("apply layer %d: %w", i, err)
		}
		name := fmt.Sprintf("%s-%d", prefix, i)
		if err := sn.Commit(ctx, name, key); err != nil {
			return "", fmt.Errorf("commit layer %d: %w", i, err)
		}
		parent = name
	}
	return parent, nil
}

// removeChain removes the image's layers, top first.
func (img *image) removeChain(ctx context.Context, sn snapshots.Snapshotter, prefix string) error {
	for i := len(img.layers) - 1; i >= 0; i-- {
		if err := sn.Remove(ctx, fmt.Sprintf("%s-%d", prefix, i)); err != nil {
			return err
		}
	}
	return nil
}
