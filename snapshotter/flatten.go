package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
	"golang.org/x/sync/singleflight"

	"github.com/overclone/overclone/fileops"
	"github.com/overclone/overclone/overlayutil"
)

// flatCache holds the flattened layers of deep stacks. ROOT/flat/<id> is the
// merged view of committed snapshot <id> and every layer below it, made by
// fileops.Flatten (reflinked where the filesystem can). Layers never change
// once committed, so a flattened layer is valid for as long as <id> exists,
// is shared by every snapshot that stands on <id>, and goes when <id> goes.
type flatCache struct {
	// group makes concurrent Prepares on the same deep parent build its
	// flattened layer once; other calls are not held up at all.
	group singleflight.Group
	// builds counts flattened layers built, for tests and metrics.
	builds atomic.Uint64
	// OnBuild, if set, is told of every build and its duration.
	onBuild func(time.Duration)
	// onCopy, if set, is told of the bytes every flattening and every
	// userspace materialization copied, by reason and method.
	onCopy func(reason, method string, bytes int64)
}

// FlattenBuilds returns how many flattened layers this snapshotter built.
func (s *Snapshotter) FlattenBuilds() uint64 { return s.flat.builds.Load() }

// OnFlatten registers fn to be called after every flattened layer built.
func (s *Snapshotter) OnFlatten(fn func(time.Duration)) { s.flat.onBuild = fn }

// OnCopy registers fn to be told the bytes overclone's engine copied, by
// reason ("flatten" or "materialize") and method ("reflink",
// "copy_file_range" or "copy").
func (s *Snapshotter) OnCopy(fn func(reason, method string, bytes int64)) { s.flat.onCopy = fn }

func (s *Snapshotter) countCopied(reason string, st fileops.FlattenStats) {
	if s.flat.onCopy == nil {
		return
	}
	for method, n := range map[string]int64{"reflink": st.Reflinked, "copy_file_range": st.CopyFileRanged, "copy": st.ReadWritten} {
		if n > 0 {
			s.flat.onCopy(reason, method, n)
		}
	}
}

func (s *Snapshotter) flatPath(id string) string {
	return filepath.Join(s.root, flatDir, id)
}

// flattenedMount mounts a stack of which at most fits layers fit in one
// overlay: it keeps layers from the top and replaces the rest, from the
// bottom up, by one flattened layer.
//
// Where the cut falls decides how often flattening happens. A cut at a
// fixed distance from the top would move with every layer an image adds,
// and each Prepare of an unpack past the limit would flatten anew. Cuts
// fall instead on multiples of flattenStep counted from the bottom: an
// unpack of a 1000-layer image flattens twice, and every image and
// container on the same base shares those layers.
func (s *Snapshotter) flattenedMount(ctx context.Context, ids []string, fits int, upper, work string) (mount.Mount, []string, error) {
	step := max(s.maxStack/2, 1)
	// The flattened layer's path differs in length from the link it
	// replaces, so try from the depth that fitted downwards; paths are
	// only strings here, nothing is built until the shape is known.
	for n := min(fits, len(ids)); n >= 1; n-- {
		flattened := min(roundUp(len(ids)-(n-1), step), len(ids))
		keep := len(ids) - flattened
		lowers := append(s.lowerdirs(ids[:keep], true), s.flatPath(ids[keep]))
		m, err := overlayutil.OverlayMount(lowers, upper, work, s.overlay)
		var fit *overlayutil.FitError
		if errors.As(err, &fit) {
			continue
		}
		if err != nil {
			return mount.Mount{}, nil, err
		}
		if err := s.linkLayers(ids[:keep]); err != nil {
			return mount.Mount{}, nil, err
		}
		if err := s.flatten(ctx, ids[keep:]); err != nil {
			return mount.Mount{}, nil, err
		}
		return m, lowers, nil
	}
	return mount.Mount{}, nil, fmt.Errorf("stack of %d layers does not fit in an overlay mount even flattened", len(ids))
}

func roundUp(n, step int) int {
	return (n + step - 1) / step * step
}

// FlattenLabel on a View asks for the flattened layers a container on the
// parent will stand on, built now rather than by the container's Prepare:
// the view mounts read-only on exactly those lowers. A stack that fits in
// one overlay mount needs none, and none is built. It is how `overclone
// flatten` reaches the daemon through the snapshots API.
const FlattenLabel = "containerd.io/snapshot/overclone.flatten"

func wantsFlatView(snap storage.Snapshot, info snapshots.Info) bool {
	_, ok := info.Labels[FlattenLabel]
	return ok && snap.Kind == snapshots.KindView && len(snap.ParentIDs) > 0
}

// flatView mounts a view on the lowers of a container on its parent. The
// container's mount carries an upperdir and a workdir, which take room in
// the one-page option string and so can move the cut; this view's own
// paths stand in for them (a snapshot prepared after it gets an id at least
// as long). In userspace mode the parent already is one complete
// directory.
func (s *Snapshotter) flatView(ctx context.Context, snap storage.Snapshot) ([]mount.Mount, error) {
	if s.mode == ModeUserspace {
		return bind(s.upperPath(snap.ParentIDs[0]), true), nil
	}
	_, lowers, err := s.stackMount(ctx, snap.ParentIDs, s.upperPath(snap.ID), s.workPath(snap.ID))
	if err != nil {
		return nil, err
	}
	if len(lowers) == 1 {
		return bind(lowers[0], true), nil
	}
	m, err := overlayutil.OverlayMount(lowers, "", "", s.overlay)
	if err != nil {
		return nil, err
	}
	return []mount.Mount{m}, nil
}

// flatten makes sure ROOT/flat/<ids[0]> holds the merged view of ids (top
// first). The build runs under no lock and with no transaction open.
func (s *Snapshotter) flatten(ctx context.Context, ids []string) error {
	dir := s.flatPath(ids[0])
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	_, err, _ := s.flat.group.Do(ids[0], func() (any, error) {
		if _, err := os.Stat(dir); err == nil {
			return nil, nil // built while we queued
		}
		// The build is shared: one caller's cancellation must not fail
		// the others waiting on it, but the daemon stopping ends it.
		ctx, cancel := s.shared(ctx)
		defer cancel()
		return nil, s.buildFlat(ctx, ids, dir)
	})
	return err
}

func (s *Snapshotter) buildFlat(ctx context.Context, ids []string, dir string) error {
	start := time.Now()
	tmp, err := os.MkdirTemp(filepath.Join(s.root, flatDir), "new-")
	if err != nil {
		return fmt.Errorf("flatten: %w", err)
	}
	defer os.RemoveAll(tmp) // gone after the rename, unless it failed
	// A flattened layer lower in the same chain already holds the merged
	// view of everything below it: start from it rather than from the
	// bottom, so each cut only flattens the layers since the last one.
	var layers []string
	for _, id := range ids {
		if len(layers) > 0 {
			if _, err := os.Stat(s.flatPath(id)); err == nil {
				layers = append(layers, s.flatPath(id))
				break
			}
		}
		layers = append(layers, s.upperPath(id))
	}
	var opts []fileops.StackOpt
	if s.overlay.UserXattr {
		opts = append(opts, fileops.WithUserXattr())
	}
	stack, err := fileops.NewStack("", layers, opts...)
	if err != nil {
		return fmt.Errorf("flatten layers %s..%s: %w", ids[0], ids[len(ids)-1], err)
	}
	stats, err := fileops.Flatten(ctx, stack, tmp)
	if err != nil {
		return fmt.Errorf("flatten layers %s..%s: %w", ids[0], ids[len(ids)-1], err)
	}
	// A flattened layer is trusted as long as its snapshot lives: it must
	// not come back empty after a power cut.
	if err := syncFilesystem(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("move flattened layer into place at %s: %w", dir, err)
	}
	took := time.Since(start)
	s.countCopied("flatten", stats)
	s.flat.builds.Add(1)
	if s.flat.onBuild != nil {
		s.flat.onBuild(took)
	}
	log.G(ctx).WithField("id", ids[0]).WithField("layers", len(ids)).WithField("read", len(layers)).WithField("files", stats.Files).
		WithField("reflinked", stats.Reflinked).WithField("took", took).Info("flattened layer built")
	return nil
}
