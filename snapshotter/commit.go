package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
)

// Commit turns the active snapshot key into the committed snapshot name.
//
// containerd's built-in overlayfs snapshotter walks the layer for its usage
// inside bolt's write transaction, so every other Prepare, Commit and Remove
// on the node waits for the walk. Here the walk (and the sync that makes the
// layer durable) happen first, under no lock; the write transaction only
// checks that the snapshot is still the one that was walked and records it.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	if err := validateKey("name", name); err != nil {
		return err
	}
	if err := validateKey("key", key); err != nil {
		return err
	}
	base, err := applyOpts(opts)
	if err != nil {
		return err
	}
	defer s.dedupe.idle.done(key, true) // after its own dedupe

	id, info, err := s.active(ctx, key)
	if err != nil {
		return err
	}
	s.placing.wait(id)
	if err := s.missing.check(id); err != nil {
		return fmt.Errorf("commit %q: %w", key, err)
	}
	if s.mode == ModeUserspace && info.Parent == "" && base.Parent != "" {
		// A userspace snapshot holds its whole view: a layer unpacked
		// alone has neither its parent's files nor its whiteouts.
		return fmt.Errorf("commit %q onto parent %q: rebase is not supported in userspace mode (do not advertise the rebase capability): %w", key, base.Parent, errdefs.ErrFailedPrecondition)
	}
	usage, err := s.walkAndSync(ctx, id, info)
	if err != nil {
		// A Remove of the same key may have taken the directory
		// away under the walk: say so with the class the built-in
		// returns for a key that is gone, not an I/O error.
		if gone := s.stillActive(ctx, key, id); gone != nil {
			return gone
		}
		return err
	}
	err = s.update(ctx, func(ctx context.Context) error {
		if err := stillActiveTx(ctx, key, id); err != nil {
			return err
		}
		if _, err := storage.CommitActive(ctx, key, name, usage, opts...); err != nil {
			return fmt.Errorf("commit %q as %q: %w", key, name, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.preflatten(ctx, id)
	s.afterCommit(ctx, name, id)
	return nil
}

// walkAndSync measures the layer and, with sync_on_commit, makes it
// durable: the part of Commit that runs under no lock.
func (s *Snapshotter) walkAndSync(ctx context.Context, id string, info snapshots.Info) (snapshots.Usage, error) {
	upper := s.upperPath(id)
	usage, err := s.usage(ctx, s.snapshotDir(id), upper, info.Created)
	if err != nil {
		return snapshots.Usage{}, err
	}
	if testHookCommitWalked != nil {
		testHookCommitWalked()
	}
	if s.syncs {
		if err := syncFilesystem(upper); err != nil {
			return snapshots.Usage{}, err
		}
	}
	return usage, nil
}

// stillActive returns nil if key is still the active snapshot id that a
// Commit started on, and the error Commit must return if not.
func (s *Snapshotter) stillActive(ctx context.Context, key, id string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return stillActiveTx(ctx, key, id)
	})
}

func stillActiveTx(ctx context.Context, key, id string) error {
	again, _, _, err := storage.GetInfo(ctx, key)
	if err != nil {
		return fmt.Errorf("commit %q: removed while it was committed: %w", key, err)
	}
	if again != id {
		return fmt.Errorf("snapshot %q was removed and prepared again while it was committed: %w", key, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// testHookCommitWalked, when a test sets it, runs between Commit's walk and
// its write transaction: the point where containerd's built-in snapshotter
// still holds the database.
var testHookCommitWalked func()

// active returns the id and info of key, which must be an active snapshot.
func (s *Snapshotter) active(ctx context.Context, key string) (string, snapshots.Info, error) {
	var (
		id   string
		info snapshots.Info
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		id, info, _, err = storage.GetInfo(ctx, key)
		if err != nil {
			return fmt.Errorf("commit %q: %w", key, err)
		}
		if info.Kind != snapshots.KindActive {
			return fmt.Errorf("commit %q: snapshot is %s, only an active snapshot can be committed: %w", key, info.Kind, errdefs.ErrFailedPrecondition)
		}
		return nil
	})
	return id, info, err
}

// ensureLink makes l/<short> point at the layer's fs dir, replacing a link
// left by a layer whose id was reused after a crash. Two first mounts of
// the same deep stack may make the same link at once: the link is made
// under a name of its own and renamed over l/<short>, which succeeds for
// both and leaves the same link.
func (s *Snapshotter) ensureLink(id string) error {
	link := s.linkPath(id)
	target := filepath.Join("..", snapshotsDir, id, "fs")
	if cur, err := os.Readlink(link); err == nil && cur == target {
		return nil
	}
	tmp := link + ".new-" + strconv.FormatUint(linkSeq.Add(1), 36)
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("link layer %s: %w", id, err)
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("link layer %s: %w", id, err)
	}
	return nil
}

var linkSeq atomic.Uint64
