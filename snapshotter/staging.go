package snapshotter

import (
	"context"
	"os"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/overclone/overclone/fileops"
)

// stagingMaxAge is how long a staging entry of a process that still
// exists may stay unchanged before it is taken for a leftover: that pid may
// since belong to an unrelated process. A live copy changes its entry
// (a directory as it fills, a file as it is written) far more often; an
// hour spares the slowest `overclone cp` of a huge tree.
const stagingMaxAge = time.Hour

// activeLayers is what cleaning one active snapshot needs to know.
type activeLayers struct {
	key, id string
	parents []string
}

// cleanStaging removes, in the background, the staging entries that
// interrupted copies left in active snapshots: an `overclone cp` killed
// between building an entry and renaming it into place leaves it in the
// upper or the work dir, and nothing else would ever remove it. Only
// active snapshots are cleaned; a committed layer is never written, and
// fileops hides a leftover in it anyway. At start no copy of this daemon
// runs, but a cp process may: fileops.CleanStaging leaves the entries of a
// live process alone unless they are older than stagingMaxAge. Close waits
// for the walk; failures are logged and never fail the start.
func (s *Snapshotter) cleanStaging(ctx context.Context) {
	var actives []activeLayers
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind != snapshots.KindActive {
				return nil
			}
			snap, err := storage.GetSnapshot(ctx, info.Name)
			if err != nil {
				return err
			}
			actives = append(actives, activeLayers{key: info.Name, id: snap.ID, parents: snap.ParentIDs})
			return nil
		})
	})
	if err != nil && !errdefs.IsNotFound(err) { // a new root has no snapshots yet
		log.G(ctx).WithError(err).Warn("failed to list active snapshots for staging leftovers")
		return
	}
	if len(actives) == 0 {
		return
	}
	ctx = context.WithoutCancel(ctx)
	s.startup.Add(1)
	go func() {
		defer s.startup.Done()
		for _, a := range actives {
			s.cleanStagingOf(ctx, a)
		}
	}()
}

func (s *Snapshotter) cleanStagingOf(ctx context.Context, a activeLayers) {
	logger := log.G(ctx).WithField("key", a.key).WithField("id", a.id)
	stack, err := s.stagingStack(a)
	if err != nil {
		logger.WithError(err).Warn("failed to open snapshot to remove staging leftovers")
		return
	}
	removed, err := stack.CleanStaging(ctx, stagingMaxAge)
	for _, p := range removed {
		logger.WithField("path", p).Info("removed staging leftover of an interrupted copy")
	}
	if err != nil {
		logger.WithError(err).Warn("failed to remove staging leftovers")
	}
}

// stagingStack opens an active snapshot's layers as overclone cp does
// (cmd/overclone layersOf): in overlay mode the upper over its parents'
// layers, in user.overlay.* where the root mounts with userxattr, with the
// work dir cp stages in; in userspace mode the one whole directory.
func (s *Snapshotter) stagingStack(a activeLayers) (*fileops.Stack, error) {
	if s.mode == ModeUserspace {
		return fileops.NewStack(s.upperPath(a.id), nil, fileops.WithVerbatim())
	}
	var opts []fileops.StackOpt
	if s.overlay.UserXattr {
		opts = append(opts, fileops.WithUserXattr())
	}
	if _, err := os.Stat(s.workPath(a.id)); err == nil {
		opts = append(opts, fileops.WithWorkDir(s.workPath(a.id)))
	}
	return fileops.NewStack(s.upperPath(a.id), s.lowerdirs(a.parents, false), opts...)
}
