package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Prepare creates an active snapshot on parent and returns its mounts.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	s.dedupe.idle.prepare(key)
	m, err := s.createSnapshot(ctx, snapshots.KindActive, key, parent, opts)
	if err != nil {
		s.dedupe.idle.done(key, false)
	}
	return m, err
}

// View creates a read-only snapshot of parent and returns its mounts.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.createSnapshot(ctx, snapshots.KindView, key, parent, opts)
}

func (s *Snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, err error) {
	if err := validateKey("key", key); err != nil {
		return nil, err
	}
	if parent != "" {
		if err := validateKey("parent", parent); err != nil {
			return nil, err
		}
	}
	base, err := applyOpts(opts)
	if err != nil {
		return nil, err
	}
	base.Parent = parent // for mounts, which looks at the parent of a mapped snapshot
	idmap, err := s.remapping(ctx, parent, base.Labels)
	if err != nil {
		return nil, fmt.Errorf("create snapshot %q: %w", key, err)
	}
	limit, opts, err := s.limitFor(kind, base, opts)
	if err != nil {
		return nil, err
	}

	// The directory is built before the write transaction, so that the
	// transaction (which blocks every other writer) holds only a rename.
	td, err := s.prepareLimitDir(kind, limit)
	if err != nil {
		return nil, err
	}
	defer func() {
		if td != "" {
			if err := removeTree(td); err != nil {
				log.G(ctx).WithError(err).WithField("path", td).Warn("failed to remove temporary snapshot directory")
			}
		}
	}()
	// A size limit's image is made and mounted detached (limit.go); the
	// pool makes up for it after this call (last of the defers).
	if limit > 0 {
		defer s.pool.refill(ctx)
	}
	img, err := s.prepareLimit(ctx, td, limit)
	if err != nil {
		return nil, err
	}
	defer img.close()
	// In userspace mode the parent's whole view is copied in first, under
	// no lock; the write transaction checks the parent is still the one
	// copied.
	var materialized string
	if s.mode == ModeUserspace && kind == snapshots.KindActive && parent != "" {
		if materialized = s.parentID(ctx, parent); materialized != "" {
			if err := s.missing.check(materialized); err != nil {
				return nil, fmt.Errorf("create snapshot %q on %q: %w", key, parent, err)
			}
			if err := s.materialize(ctx, materialized, td, idmap); err != nil {
				return nil, err
			}
		}
	}
	if idmap != nil {
		if err := s.remapPrepared(td, idmap, materialized != ""); err != nil {
			return nil, fmt.Errorf("create snapshot %q: %w", key, err)
		}
	}
	if err := s.syncPrepared(td); err != nil {
		return nil, err
	}

	var snap storage.Snapshot
	placing := s.placing.start()
	defer placing.finish()
	err = s.update(ctx, func(ctx context.Context) error {
		var err error
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return fmt.Errorf("create snapshot %q: %w", key, err)
		}
		if err := s.missing.check(snap.ParentIDs...); err != nil {
			return fmt.Errorf("create snapshot %q on %q: %w", key, parent, err)
		}
		if materialized != "" && snap.ParentIDs[0] != materialized {
			// The parent was removed and committed again under the
			// same name while it was being copied.
			return fmt.Errorf("parent %q changed while snapshot %q was prepared: %w", parent, key, errdefs.ErrFailedPrecondition)
		}
		// The parent's directory is read here, where the parent is
		// sure to exist: once the transaction commits, a Remove of the
		// new snapshot and then of its parent may run before the
		// directory is placed (TestStorm saw it).
		if idmap == nil { // a mapped upper's root is the mapped root's (remapPrepared)
			if err := s.ownUpper(snap, td); err != nil {
				return err
			}
		}
		placing.is(snap.ID)
		return nil
	})
	if err != nil {
		return nil, err
	}
	if testHookCreateCommitted != nil {
		testHookCreateCommitted(key)
	}
	// The metadata is committed; the directory goes into place after it,
	// under no lock and with no fsync: a power cut that loses the rename
	// leaves metadata naming a directory that recreate makes again at the
	// next start (an empty upper, or a new copy of the parent).
	err = s.placeDirectory(ctx, td, snap)
	if err == nil && img != nil {
		err = img.attach(s.snapshotDir(snap.ID))
	}
	placing.finish()
	if err != nil {
		return nil, s.undoCreate(ctx, key, snap.ID, err)
	}
	if kind == snapshots.KindActive {
		s.deepActive(snap.ID, snap.ParentIDs)
	}
	td = ""                                  // renamed into place: the deferred clean-up must not touch it
	mounts, err := s.mounts(ctx, snap, base) // the labels given are the labels stored
	if err != nil {
		return nil, s.undoCreate(ctx, key, snap.ID, err)
	}
	return mounts, nil
}

// undoCreate removes a snapshot whose directory or mounts could not be
// made, so that a retry does not find it and fail with AlreadyExists, and
// returns the error to give the caller.
//
// Once the metadata is committed, other clients can remove the snapshot
// and create another under the same key: that one is not ours to remove.
// If ours is gone, that removal is most likely what made placing or
// mounting fail (its parent can go with it), and the caller is told so.
func (s *Snapshotter) undoCreate(ctx context.Context, key, id string, cause error) error {
	err := s.remove(context.WithoutCancel(ctx), key, id)
	if errdefs.IsNotFound(err) {
		return fmt.Errorf("snapshot %q was removed while it was created (%v): %w", key, cause, errdefs.ErrNotFound)
	}
	if err != nil {
		log.G(ctx).WithError(err).WithField("key", key).Warn("failed to remove snapshot whose directory or mounts could not be made")
	}
	return cause
}

// prepareDirectory makes snapshots/new-XXXX with fs (and work for active
// snapshots). The fs dir is 0755: it becomes the container's root.
func (s *Snapshotter) prepareDirectory(kind snapshots.Kind) (string, error) {
	td, err := os.MkdirTemp(filepath.Join(s.root, snapshotsDir), "new-")
	if err != nil {
		return "", fmt.Errorf("create temporary snapshot directory: %w", err)
	}
	if err := os.Mkdir(filepath.Join(td, "fs"), 0o755); err != nil {
		os.RemoveAll(td)
		return "", fmt.Errorf("create %s/fs: %w", td, err)
	}
	if kind == snapshots.KindActive {
		if err := os.Mkdir(filepath.Join(td, "work"), 0o711); err != nil {
			os.RemoveAll(td)
			return "", fmt.Errorf("create %s/work: %w", td, err)
		}
	}
	return td, nil
}

// placeDirectory renames the prepared directory to snapshots/<id>, once
// the metadata naming it is committed.
//
// A directory may already be there: bolt's sequence rolls back with a
// transaction that never committed, and a daemon before this one renamed
// inside the transaction, so a crash could leave a directory under an id
// handed out again. Nothing in the metadata can own it, so it goes to the
// trash.
func (s *Snapshotter) placeDirectory(ctx context.Context, td string, snap storage.Snapshot) error {
	target := s.snapshotDir(snap.ID)
	err := os.Rename(td, target)
	if err == nil {
		return nil
	}
	if !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("move snapshot directory into place at %s: %w", target, err)
	}
	log.G(ctx).WithField("path", target).Warn("snapshot id reused after a crash: trashing the directory left behind")
	if _, err := s.trash(target); err != nil {
		return err
	}
	if err := os.Rename(td, target); err != nil {
		return fmt.Errorf("move snapshot directory into place at %s: %w", target, err)
	}
	return nil
}

// ownUpper gives the upper's root in td the owner of the parent's root, in
// overlay mode, as the kernel gives the merged root on copy-up. The parent
// must be there: call it where the metadata still names the parent.
func (s *Snapshotter) ownUpper(snap storage.Snapshot, td string) error {
	if s.mode != ModeOverlay || len(snap.ParentIDs) == 0 {
		return nil
	}
	return copyOwner(s.upperPath(snap.ParentIDs[0]), filepath.Join(td, "fs"))
}

func copyOwner(from, to string) error {
	var st syscall.Stat_t
	if err := syscall.Stat(from, &st); err != nil {
		return fmt.Errorf("stat parent layer %s: %w", from, err)
	}
	if err := os.Lchown(to, int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("chown %s: %w", to, err)
	}
	return nil
}

// testHookCreateCommitted, when a test sets it, runs between a create's
// write transaction and the placing of its directory.
var testHookCreateCommitted func(key string)
