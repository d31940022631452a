package snapshotter

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
)

// Stat returns the info of a snapshot of any kind.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update changes the labels of a snapshot; fieldpaths name what to change
// ("labels" or "labels.<key>"), all labels when empty.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (newInfo snapshots.Info, err error) {
	if err := validateLabels(info.Labels); err != nil {
		return snapshots.Info{}, err
	}
	err = s.update(ctx, func(ctx context.Context) error {
		newInfo, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	return newInfo, err
}

// Usage returns what a snapshot takes on disk. For a committed snapshot it
// is the figure Commit recorded, less what dedupe made it share with
// another layer that counts it; for an active one its upper is walked now,
// and only its upper: the layers below are counted by their own snapshots.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	err := transact(ctx, s.ms, false, func(ctx context.Context) error {
		var err error
		if id, info, usage, err = storage.GetInfo(ctx, key); err != nil {
			return err
		}
		// What dedupe shares with another layer's copy is counted
		// by that layer (dedupe_index.go).
		ix, err := openIndex(ctx, false)
		usage.Size = max(usage.Size-ix.borrowed(id), 0)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		s.placing.wait(id)
		if err := s.missing.check(id); err != nil {
			return snapshots.Usage{}, fmt.Errorf("usage of %q: %w", key, err)
		}
		if limited(info) {
			// Its filesystem's own counters: no walk (loopimage.go,
			// qgroup.go).
			return s.limitedUsage(ctx, id, info)
		}
		return s.usages.get(ctx, id, func() (snapshots.Usage, error) {
			return s.usage(ctx, s.snapshotDir(id), s.upperPath(id), info.Created)
		})
	}
	return usage, nil
}

// Walk calls fn for every snapshot that matches the filters. A root with
// no snapshot yet has none to walk: containerd's storage says NotFound
// there (its bucket does not exist yet), which a client listing snapshots
// must not see.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	var called bool
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			called = true
			return fn(ctx, info)
		}, filters...)
	})
	if errdefs.IsNotFound(err) && !called {
		return nil
	}
	return err
}
