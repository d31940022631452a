package differ

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/epoch"
	"github.com/containerd/containerd/v2/pkg/labels"
	cfs "github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/overclone/overclone/fileops"
)

// writeBuffer is how much of a layer is handed to the content writer at
// once: 1 MiB makes a GiB 1024 round trips to containerd, well within
// its 16 MiB message limit.
const writeBuffer = 1 << 20

// writers keeps the buffers of finished Compares for the next: a fresh
// MiB per call cost a small diff more CPU than finding its changes.
var writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, writeBuffer) }}

// Differ is a diff.Comparer for overclone's snapshots. Apply it leaves to
// containerd's own appliers.
type Differ struct {
	root     string
	realRoot string // root with its links resolved, against which layers are checked
	store    content.Store
	// callCtx, when set, readies a call's context for the store: the
	// daemon's store is containerd's, reached over its socket, which
	// wants the caller's namespace and a lease on what is written.
	callCtx func(context.Context) (context.Context, error)

	served atomic.Int64
}

// Opt configures a Differ.
type Opt func(*Differ)

// WithCallContext sets how a call's context is readied before the layer is
// written to the store (see NewRemote).
func WithCallContext(f func(context.Context) (context.Context, error)) Opt {
	return func(d *Differ) { d.callCtx = f }
}

// New returns a Differ for the snapshots under root that writes layers to
// store.
func New(root string, store content.Store, opts ...Opt) (*Differ, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("differ root %s: %w", root, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return nil, fmt.Errorf("differ root %s: %w", root, err)
	}
	d := &Differ{root: filepath.Clean(abs), realRoot: real, store: store}
	for _, o := range opts {
		o(d)
	}
	return d, nil
}

// Served counts the Compares this Differ wrote a layer for (not those it
// passed on as not implemented).
func (d *Differ) Served() int64 { return d.served.Load() }

var _ diff.Comparer = (*Differ)(nil)
var _ diff.Applier = (*Differ)(nil)

// Apply is not overclone's to do: containerd's applier writes straight
// into an overlay's upperdir already.
func (d *Differ) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	return ocispec.Descriptor{}, fmt.Errorf("overclone differ does not apply layers: %w", errdefs.ErrNotImplemented)
}

// Compare writes the changes of upper (an active snapshot's overlay) over
// lower (a view of its parent) to the content store as a layer, with the
// options, media types, compression and labels of containerd's walking
// differ. Mounts that are not overclone's are errdefs.ErrNotImplemented.
func (d *Differ) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	var config diff.Config
	for _, opt := range opts {
		if err := opt(&config); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	if tm := epoch.FromContext(ctx); tm != nil && config.SourceDateEpoch == nil {
		config.SourceDateEpoch = tm
	}
	compressionType := compression.Uncompressed
	if config.Compressor != nil {
		if config.MediaType == "" {
			return ocispec.Descriptor{}, errors.New("media type must be explicitly specified when using custom compressor")
		}
		compressionType = compression.Unknown
	} else {
		if config.MediaType == "" {
			config.MediaType = ocispec.MediaTypeImageLayerGzip
		}
		switch config.MediaType {
		case ocispec.MediaTypeImageLayer:
		case ocispec.MediaTypeImageLayerGzip:
			compressionType = compression.Gzip
		case ocispec.MediaTypeImageLayerZstd:
			compressionType = compression.Zstd
		default:
			return ocispec.Descriptor{}, fmt.Errorf("unsupported diff media type: %v: %w", config.MediaType, errdefs.ErrNotImplemented)
		}
	}

	pr, err := d.open(lower, upper)
	if err != nil {
		log.G(ctx).WithError(err).Debug("overclone differ: passing on")
		return ocispec.Descriptor{}, err
	}
	if d.callCtx != nil {
		cctx, err := d.callCtx(ctx)
		if err != nil {
			// Without containerd's content store overclone cannot write
			// the layer; the walking differ, inside containerd, can.
			log.G(ctx).WithError(err).Warn("overclone differ: cannot reach containerd's content store, passing the diff on")
			return ocispec.Descriptor{}, fmt.Errorf("%v: %w", err, errdefs.ErrNotImplemented)
		}
		ctx = cctx
	}
	start := time.Now()
	desc, err := d.write(ctx, pr, config, compressionType)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	d.served.Add(1)
	log.G(ctx).WithFields(log.Fields{
		"upper":    pr.merged.Upper(),
		"digest":   desc.Digest,
		"size":     desc.Size,
		"duration": time.Since(start),
	}).Info("overclone differ: wrote layer from the upper")
	return desc, nil
}

// write streams the layer into a content writer and commits it, the way
// the walking differ does: a new ref unless the caller named one, the
// uncompressed digest as a label, and that label added to a blob that
// already existed without it.
func (d *Differ) write(ctx context.Context, pr pair, config diff.Config, ct compression.Compression) (desc ocispec.Descriptor, err error) {
	newRef := config.Reference == ""
	if newRef {
		config.Reference = uniqueRef()
	}
	cw, err := d.store.Writer(ctx, content.WithRef(config.Reference), content.WithDescriptor(ocispec.Descriptor{MediaType: config.MediaType}))
	if err != nil {
		return desc, fmt.Errorf("failed to open writer: %w", err)
	}
	committed := false
	defer func() {
		if committed {
			return
		}
		cw.Close()
		if newRef {
			if aerr := d.store.Abort(context.WithoutCancel(ctx), config.Reference); aerr != nil {
				log.G(ctx).WithError(aerr).WithField("ref", config.Reference).Warn("failed to delete diff upload")
			}
		}
	}()
	if !newRef {
		if err := cw.Truncate(0); err != nil {
			return desc, err
		}
	}

	// The daemon's content writer is containerd's, over its socket: one
	// round trip per Write, and the tar writer writes in 32 KiB pieces.
	bw := writers.Get().(*bufio.Writer)
	bw.Reset(cw)
	defer func() {
		bw.Reset(nil)
		writers.Put(bw)
	}()
	if ct != compression.Uncompressed {
		dgstr := digest.SHA256.Digester()
		var compressed io.WriteCloser
		if config.Compressor != nil {
			compressed, err = config.Compressor(bw, config.MediaType)
		} else {
			compressed, err = compression.CompressStream(bw, ct)
		}
		if err != nil {
			return desc, fmt.Errorf("failed to get compressed stream: %w", err)
		}
		err = d.writeTar(ctx, io.MultiWriter(compressed, dgstr.Hash()), pr, config.SourceDateEpoch)
		if cerr := compressed.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return desc, fmt.Errorf("failed to write compressed diff: %w", err)
		}
		if config.Labels == nil {
			config.Labels = map[string]string{}
		}
		config.Labels[labels.LabelUncompressed] = dgstr.Digest().String()
	} else if err := d.writeTar(ctx, bw, pr, config.SourceDateEpoch); err != nil {
		return desc, fmt.Errorf("failed to write diff: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return desc, fmt.Errorf("failed to write diff: %w", err)
	}

	var commitOpts []content.Opt
	if config.Labels != nil {
		commitOpts = append(commitOpts, content.WithLabels(config.Labels))
	}
	dgst := cw.Digest()
	if err := cw.Commit(ctx, 0, dgst, commitOpts...); err != nil && !errdefs.IsAlreadyExists(err) {
		return desc, fmt.Errorf("failed to commit: %w", err)
	}
	committed = true
	info, err := d.store.Info(ctx, dgst)
	if err != nil {
		return desc, fmt.Errorf("failed to get info from content store: %w", err)
	}
	if info.Labels == nil {
		info.Labels = map[string]string{}
	}
	if _, ok := info.Labels[labels.LabelUncompressed]; !ok {
		info.Labels[labels.LabelUncompressed] = config.Labels[labels.LabelUncompressed]
		if _, err := d.store.Update(ctx, info, "labels."+labels.LabelUncompressed); err != nil {
			return desc, fmt.Errorf("error setting uncompressed label: %w", err)
		}
	}
	return ocispec.Descriptor{MediaType: config.MediaType, Size: info.Size, Digest: info.Digest}, nil
}

// writeTar writes the uncompressed layer of pr to w.
func (d *Differ) writeTar(ctx context.Context, w io.Writer, pr pair, upperBound *time.Time) error {
	lw := newLayerWriter(w, pr.merged, upperBound)
	err := pr.changes(ctx, func(k cfs.ChangeKind, p string, e fileops.Entry) error {
		return lw.handle(ctx, k, p, e)
	})
	if err != nil {
		return fmt.Errorf("diff of %s: %w", pr.merged.Upper(), err)
	}
	return lw.Close()
}

func uniqueRef() string {
	var b [6]byte
	rand.Read(b[:])
	return fmt.Sprintf("overclone-diff-%d-%s", time.Now().UnixNano(), base64.URLEncoding.EncodeToString(b[:]))
}
