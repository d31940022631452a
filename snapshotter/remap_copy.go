package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"

	"github.com/overclone/overclone/fileops"
	"github.com/overclone/overclone/overlayutil"
)

// Where the kernel cannot idmap the layers (overlay before 5.19, a root
// filesystem without idmapped mounts), a mapped snapshot stands on a copy of
// its parent's view with the owners shifted (shiftOwners), made by fileops
// with reflinks where the filesystem has them: the data stays shared with
// the image, only the inodes are new. containerd's client makes such a copy
// itself for a snapshotter without remap-ids, through an overlay mount, so
// every file is copied up whole; the built-in's slow_chown is that.
//
// The copy is snapshots/<id>/remap, the snapshot's own: it goes with the
// snapshot, to the trash, and nothing else needs to know of it. It is the
// only lower of an active snapshot (whose fs dir stays its upper, so a
// Commit is a diff as usual) and the whole of a view. Mounts builds it the
// first time it is asked, and again if a crash lost it.
//
// Each mapped snapshot has its own copy: Kubernetes gives every pod a
// mapping of its own, so a copy shared per (parent, mapping) would serve
// only a pod's restarts.
const remapCopyDir = "remap"

// needsRemapCopy tells a mapped snapshot whose view needs its ids shifted
// where no idmapped layer can do it.
func (s *Snapshotter) needsRemapCopy(snap storage.Snapshot) bool {
	if s.idmapped || len(snap.ParentIDs) == 0 {
		return false
	}
	// A userspace container is a shifted copy already.
	return s.mode == ModeOverlay || snap.Kind == snapshots.KindView
}

// remapCopyMounts mounts a mapped snapshot on its shifted copy.
func (s *Snapshotter) remapCopyMounts(ctx context.Context, snap storage.Snapshot, m *idMapping) ([]mount.Mount, error) {
	dir, err := s.remapCopy(ctx, snap, m)
	if err != nil {
		return nil, err
	}
	if snap.Kind == snapshots.KindView {
		return bind(dir, true), nil
	}
	om, err := overlayutil.OverlayMount([]string{dir}, s.upperPath(snap.ID), s.workPath(snap.ID), s.overlay)
	if err != nil {
		return nil, fmt.Errorf("mount shifted copy of %s: %w", snap.ID, err)
	}
	return []mount.Mount{om}, nil
}

// remapCopy makes sure snapshots/<id>/remap holds the shifted copy of the
// snapshot's parent view, and returns it. Concurrent calls for one snapshot
// build it once.
func (s *Snapshotter) remapCopy(ctx context.Context, snap storage.Snapshot, m *idMapping) (string, error) {
	dir := filepath.Join(s.snapshotDir(snap.ID), remapCopyDir)
	if _, err := os.Lstat(dir); err == nil {
		return dir, nil
	}
	_, err, _ := s.remapBuilds.Do(snap.ID, func() (any, error) {
		if _, err := os.Lstat(dir); err == nil {
			return nil, nil // built while we queued
		}
		ctx, cancel := s.shared(ctx)
		defer cancel()
		return nil, s.buildRemapCopy(ctx, snap, m, dir)
	})
	if err != nil {
		return "", err
	}
	return dir, nil
}

func (s *Snapshotter) buildRemapCopy(ctx context.Context, snap storage.Snapshot, m *idMapping, dir string) error {
	start := time.Now()
	tmp, err := os.MkdirTemp(s.snapshotDir(snap.ID), remapCopyDir+"-new-")
	if err != nil {
		return fmt.Errorf("shifted copy of %s: %w", snap.ID, err)
	}
	defer os.RemoveAll(tmp) // gone after the rename, unless it failed
	var (
		layers []string
		opts   []fileops.StackOpt
	)
	if s.mode == ModeUserspace {
		// The parent's dir is its whole view.
		layers, opts = []string{s.upperPath(snap.ParentIDs[0])}, []fileops.StackOpt{fileops.WithVerbatim()}
	} else {
		layers = s.lowerdirs(snap.ParentIDs, false)
		if s.overlay.UserXattr {
			opts = append(opts, fileops.WithUserXattr())
		}
	}
	stack, err := fileops.NewStack("", layers, opts...)
	if err != nil {
		return fmt.Errorf("shifted copy of %s: %w", snap.ID, err)
	}
	stats, err := fileops.Flatten(ctx, stack, tmp)
	if err != nil {
		return fmt.Errorf("shifted copy of %s: %w", snap.ID, err)
	}
	if err := shiftOwners(ctx, tmp, m); err != nil {
		return fmt.Errorf("shifted copy of %s: %w", snap.ID, err)
	}
	// The copy is a lower trusted for the snapshot's life, as a flattened
	// layer is: it must not come back empty after a power cut.
	if s.syncs {
		if err := syncFilesystem(tmp); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("move shifted copy of %s into place: %w", snap.ID, err)
	}
	s.countCopied("remap", stats)
	log.G(ctx).WithField("id", snap.ID).WithField("layers", len(layers)).WithField("files", stats.Files).
		WithField("reflinked", stats.Reflinked).WithField("took", time.Since(start)).Info("shifted copy built for a user-namespaced snapshot")
	return nil
}
