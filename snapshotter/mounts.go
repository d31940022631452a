package snapshotter

import (
	"context"
	"fmt"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
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
			return fmt.Errorf("get info of %q: %w", key, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.missing.check(append([]string{snap.ID}, snap.ParentIDs...)...); err != nil {
		return nil, fmt.Errorf("get mounts of %q: %w", key, err)
	}
	return s.mounts(snap, info), nil
}

// mounts builds the mounts containerd expects for a snapshot:
//   - active, no parent: a rw bind of its own fs dir;
//   - view of one committed layer: a ro bind of that layer;
//   - otherwise overlay, lowerdir top first, with upperdir and workdir for
//     an active snapshot.
//
// Deep stacks name their layers by short links (see lowerdirs).
func (s *Snapshotter) mounts(snap storage.Snapshot, info snapshots.Info) []mount.Mount {
	if len(snap.ParentIDs) == 0 {
		mode := "rw"
		if snap.Kind == snapshots.KindView {
			mode = "ro"
		}
		return []mount.Mount{{
			Type:    "bind",
			Source:  s.upperPath(snap.ID),
			Options: []string{mode, "rbind"},
		}}
	}
	if snap.Kind == snapshots.KindView && len(snap.ParentIDs) == 1 {
		return []mount.Mount{{
			Type:    "bind",
			Source:  s.upperPath(snap.ParentIDs[0]),
			Options: []string{"ro", "rbind"},
		}}
	}

	var options []string
	if snap.Kind == snapshots.KindActive {
		options = append(options,
			"workdir="+s.workPath(snap.ID),
			"upperdir="+s.upperPath(snap.ID),
		)
		if s.volatile {
			options = append(options, "volatile")
		}
	}
	options = append(options, "lowerdir="+strings.Join(s.lowerdirs(snap.ParentIDs), ":"))
	options = append(options, s.options...)
	return []mount.Mount{{
		Type:    "overlay",
		Source:  "overlay",
		Options: options,
	}}
}

// compactBudget is what a lowerdir= list may take once containerd's
// core/mount has compacted it (made the paths relative to their common
// directory) so that the whole option string stays within one page: the
// page, less the 512 bytes containerd keeps in reserve, less room for
// upperdir=, workdir= and the other options.
const compactBudget = 4096 - 512 - 1024

// lowerdirs names the layers of a stack, top first. A shallow stack uses
// the layers' own paths, snapshots/<id>/fs; one too deep for those to fit in
// a page even compacted uses the short links l/<base36 id>, made here the
// first time a stack needs them and kept until the layer is removed. Links
// cost a symlink per layer, so only stacks that need them pay for them.
func (s *Snapshotter) lowerdirs(ids []string) []string {
	size := 0
	for _, id := range ids {
		size += len(id) + len("/fs:")
	}
	lowers := make([]string, len(ids))
	if size <= compactBudget {
		for i, id := range ids {
			lowers[i] = s.upperPath(id)
		}
		return lowers
	}
	for i, id := range ids {
		lowers[i] = s.linkPath(id)
		if err := s.ensureLink(id); err != nil {
			// The mount will fail and say which path is missing.
			log.L.WithError(err).WithField("id", id).Warn("failed to link layer for a deep stack")
		}
	}
	return lowers
}
