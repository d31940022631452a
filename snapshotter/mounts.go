package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"

	"github.com/overclone/overclone/overlayutil"
)

// Mounts returns the mounts of an active snapshot or a view.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var (
		snap storage.Snapshot
		info snapshots.Info
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		if snap, err = storage.GetSnapshot(ctx, key); err != nil {
			return fmt.Errorf("get mounts of %q: %w", key, err)
		}
		if _, info, _, err = storage.GetInfo(ctx, key); err != nil {
			return fmt.Errorf("get mounts of %q: %w", key, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.placing.wait(snap.ID)
	if err := errors.Join(s.missing.check(snap.ID), s.missing.check(snap.ParentIDs...)); err != nil {
		return nil, fmt.Errorf("get mounts of %q: %w", key, err)
	}
	return s.mounts(ctx, snap, info)
}

// plainMounts builds the mounts containerd expects for a snapshot, before
// any user-namespace mapping (remap.go) shapes them.
//
// In overlay mode: an active snapshot with no parent is a rw bind of its fs
// dir, a view of one committed layer a ro bind of that layer, anything else
// an overlay, lowerdir top first, with upperdir and workdir for an active
// snapshot. A stack deeper than one mount takes has its bottom layers
// replaced by one flattened layer (see flatten.go).
//
// In userspace mode every snapshot is a complete directory: an active
// snapshot is a rw bind of its own, a view a ro bind of its parent's.
func (s *Snapshotter) plainMounts(ctx context.Context, snap storage.Snapshot, info snapshots.Info) ([]mount.Mount, error) {
	if wantsFlatView(snap, info) {
		return s.flatView(ctx, snap)
	}
	if s.mode == ModeUserspace {
		return s.userspaceMounts(snap), nil
	}
	ids := snap.ParentIDs
	if len(ids) == 0 && snap.Kind == snapshots.KindActive && isExtraction(info) {
		return s.extractionMounts(snap)
	}
	if len(ids) == 0 {
		return bind(s.upperPath(snap.ID), snap.Kind == snapshots.KindView), nil
	}
	var upper, work string
	if snap.Kind == snapshots.KindActive {
		upper, work = s.upperPath(snap.ID), s.workPath(snap.ID)
	}
	m, _, err := s.stackMount(ctx, ids, upper, work)
	if err != nil {
		return nil, err
	}
	return []mount.Mount{m}, nil
}

// stackMount is the overlay mount of the committed layers ids (top first)
// under upper and work ("" for a view), and the lowerdirs it uses: the
// layers' own paths where they fit, their short links where those fit, and
// otherwise a stack whose bottom layers are flattened (built now if they
// were not yet).
func (s *Snapshotter) stackMount(ctx context.Context, ids []string, upper, work string) (mount.Mount, []string, error) {
	if len(ids) > s.maxStack {
		// Over the configured depth: flatten whatever the cap leaves.
		return s.flattenedMount(ctx, ids, s.maxStack, upper, work)
	}
	lowers := s.lowerdirs(ids, false)
	m, err := overlayutil.OverlayMount(lowers, upper, work, s.overlay)
	if err == nil {
		return m, lowers, nil
	}
	var fit *overlayutil.FitError
	if !errors.As(err, &fit) {
		return mount.Mount{}, nil, err
	}
	if errors.Is(err, overlayutil.ErrOptionsTooLong) {
		// Too long with the layers' own paths: name them by their
		// short links, which compact to a third of the length.
		lowers = s.lowerdirs(ids, true)
		m, err = overlayutil.OverlayMount(lowers, upper, work, s.overlay)
		if err == nil {
			if err := s.linkLayers(ids); err != nil {
				return mount.Mount{}, nil, err
			}
			return m, lowers, nil
		}
		if !errors.As(err, &fit) {
			return mount.Mount{}, nil, err
		}
	}
	return s.flattenedMount(ctx, ids, fit.Fits, upper, work)
}

// lowerdirs names the layers of a stack, top first: by their own paths,
// snapshots/<id>/fs, or by their short links, l/<base36 id>. Only names:
// the links a chosen mount uses are made by linkLayers.
func (s *Snapshotter) lowerdirs(ids []string, short bool) []string {
	lowers := make([]string, len(ids))
	for i, id := range ids {
		if short {
			lowers[i] = s.linkPath(id)
		} else {
			lowers[i] = s.upperPath(id)
		}
	}
	return lowers
}

// linkLayers makes the short links of layers, the first time a stack too
// deep for the plain paths needs them; they stay until the layer is
// removed. Links cost a symlink per layer, so only deep stacks pay, once.
func (s *Snapshotter) linkLayers(ids []string) error {
	for _, id := range ids {
		if _, ok := s.linked.Load(id); ok {
			continue
		}
		if err := s.ensureLink(id); err != nil {
			return err
		}
		s.linked.Store(id, struct{}{})
	}
	return nil
}

func (s *Snapshotter) userspaceMounts(snap storage.Snapshot) []mount.Mount {
	if snap.Kind == snapshots.KindActive || len(snap.ParentIDs) == 0 {
		// A view of nothing is its own empty dir.
		return bind(s.upperPath(snap.ID), snap.Kind == snapshots.KindView)
	}
	return bind(s.upperPath(snap.ParentIDs[0]), true)
}

// bind is the mount of one directory, read-only or not.
func bind(source string, ro bool) []mount.Mount {
	mode := "rw"
	if ro {
		mode = "ro"
	}
	return []mount.Mount{{Type: "bind", Source: source, Options: []string{mode, "rbind"}}}
}

// isExtraction tells a layer being unpacked from any other snapshot:
// containerd's unpacker labels the snapshots it applies layers into.
func isExtraction(info snapshots.Info) bool {
	_, ok := info.Labels[snapshots.LabelSnapshotRef]
	return ok
}

// extractionMounts mounts a parentless layer being unpacked as an overlay
// of its upper on an empty lower, where containerd's built-in snapshotter
// hands out a bind.
//
// containerd 2.2+ unpacks layers in parallel when a snapshotter has the
// "rebase" capability: each layer is prepared with no parent and given one
// at Commit. containerd's applier turns a tar's whiteouts into overlay
// whiteouts only when it writes into an overlay's upperdir; into a bind it
// applies them by deleting files that are not there, and they are lost.
// containerd patches the mounts for its own overlayfs snapshotter only
// (core/unpack bindToOverlay), so overclone shapes them itself: the
// applier writes whiteouts and opaque markers into the upper, and the
// layer is a proper diff whichever parent it is committed onto. The mount
// is a real one: anything that mounts it sees the layer's files.
func (s *Snapshotter) extractionMounts(snap storage.Snapshot) ([]mount.Mount, error) {
	m, err := overlayutil.OverlayMount([]string{filepath.Join(s.root, emptyDir)}, s.upperPath(snap.ID), s.workPath(snap.ID), s.overlay)
	if err != nil {
		return nil, err
	}
	return []mount.Mount{m}, nil
}
