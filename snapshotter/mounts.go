package snapshotter

import (
	"context"
	"fmt"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
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
	return s.mounts(snap, info), nil
}

// mounts builds the mounts containerd expects for a snapshot:
//   - active, no parent: a rw bind of its own fs dir;
//   - view of one committed layer: a ro bind of that layer;
//   - otherwise overlay, lowerdir top first, with upperdir and workdir for
//     an active snapshot.
//
// Committed layers are named by their short links (see linkPath).
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
			Source:  s.linkPath(snap.ParentIDs[0]),
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
	lowers := make([]string, len(snap.ParentIDs))
	for i, id := range snap.ParentIDs {
		lowers[i] = s.linkPath(id)
	}
	options = append(options, "lowerdir="+strings.Join(lowers, ":"))
	options = append(options, s.options...)
	return []mount.Mount{{
		Type:    "overlay",
		Source:  "overlay",
		Options: options,
	}}
}
