package snapshotter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync"
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
// its parent's view with the owners shifted (ownerMap), made by fileops
// with reflinks where the filesystem has them: the data stays shared with
// the image, only the inodes are new. containerd's client makes such a copy
// itself for a snapshotter without remap-ids, through an overlay mount, so
// every file is copied up whole; the built-in's slow_chown is that.
//
// The copy is ROOT/remap/<parent id>-<mapping digest>: every snapshot on
// the same parent with the same mapping (a pod's containers, a restarted
// container) stands on the one copy, built by the first Mounts that needs
// it. It is the only lower of an active snapshot (whose fs dir stays its
// upper, so a Commit is a diff as usual) and the whole of a view. It goes
// when the last snapshot with that parent and mapping is removed; a crash
// in between leaves it for the next start, which removes every copy no
// snapshot needs. A lock per copy orders the build, the use by Mounts and
// the check at removal, so a copy is never removed under a snapshot that
// was being created meanwhile: that one's Mounts builds it again.
const remapCopiesDir = "remap"

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

// remapCopyKey names the copy of parent id's view under mapping m.
func remapCopyKey(parentID string, m *idMapping) string {
	sum := sha256.Sum256([]byte(m.uidLabel + "\n" + m.gidLabel))
	return parentID + "-" + hex.EncodeToString(sum[:8])
}

func (s *Snapshotter) remapCopyPath(key string) string {
	return filepath.Join(s.root, remapCopiesDir, key)
}

// remapLock returns the lock of one copy.
func (s *Snapshotter) remapLock(key string) *sync.Mutex {
	mu, _ := s.remapLocks.LoadOrStore(key, new(sync.Mutex))
	return mu.(*sync.Mutex)
}

// remapCopy makes sure the shifted copy a snapshot stands on exists, and
// returns it. Concurrent calls for one copy build it once; calls for other
// copies do not wait.
func (s *Snapshotter) remapCopy(ctx context.Context, snap storage.Snapshot, m *idMapping) (string, error) {
	key := remapCopyKey(snap.ParentIDs[0], m)
	dir := s.remapCopyPath(key)
	mu := s.remapLock(key)
	mu.Lock()
	defer mu.Unlock()
	if _, err := os.Lstat(dir); err == nil {
		return dir, nil
	}
	// The build is shared: one caller's cancellation must not leave the
	// others without it, but the daemon stopping ends it.
	ctx, cancel := s.shared(ctx)
	defer cancel()
	if err := s.buildRemapCopy(ctx, snap, m, dir); err != nil {
		return "", err
	}
	return dir, nil
}

func (s *Snapshotter) buildRemapCopy(ctx context.Context, snap storage.Snapshot, m *idMapping, dir string) error {
	start := time.Now()
	if err := os.Mkdir(filepath.Dir(dir), 0o700); err != nil && !os.IsExist(err) {
		return fmt.Errorf("shifted copy of %s: %w", snap.ParentIDs[0], err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "new-")
	if err != nil {
		return fmt.Errorf("shifted copy of %s: %w", snap.ParentIDs[0], err)
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
		return fmt.Errorf("shifted copy of %s: %w", snap.ParentIDs[0], err)
	}
	// One walk: each inode is made with its mapped owner.
	stats, err := fileops.Flatten(ctx, stack, tmp, m.flattenOpts()...)
	if err != nil {
		return fmt.Errorf("shifted copy of %s: %w", snap.ParentIDs[0], err)
	}
	// The copy is a lower trusted for the snapshot's life, as a flattened
	// layer is: it must not come back empty after a power cut.
	if s.syncs {
		if err := syncFilesystem(tmp); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("move shifted copy of %s into place: %w", snap.ParentIDs[0], err)
	}
	s.countCopied("remap", stats)
	log.G(ctx).WithField("copy", filepath.Base(dir)).WithField("layers", len(layers)).WithField("files", stats.Files).
		WithField("reflinked", stats.Reflinked).WithField("took", time.Since(start)).Info("shifted copy built for a user-namespaced snapshot")
	return nil
}

// remapRelease is what Remove needs to release a removed snapshot's copy.
type remapRelease struct {
	parentID string
	m        *idMapping
}

// remapReleaseOf reads, inside Remove's transaction, whether key stands on
// a shifted copy: nil where copies are not made, or key has no mapping or
// no parent.
func (s *Snapshotter) remapReleaseOf(ctx context.Context, key string) *remapRelease {
	if s.idmapped {
		return nil
	}
	_, info, _, err := storage.GetInfo(ctx, key)
	if err != nil || info.Parent == "" {
		return nil
	}
	m, err := remapOf(info.Labels)
	if err != nil || m == nil {
		return nil
	}
	pid, _, _, err := storage.GetInfo(ctx, info.Parent)
	if err != nil {
		return nil
	}
	return &remapRelease{parentID: pid, m: m}
}

// releaseRemapCopy removes the copy a removed snapshot stood on, unless
// another snapshot with the same parent and mapping still does.
func (s *Snapshotter) releaseRemapCopy(ctx context.Context, parentID string, m *idMapping) {
	key := remapCopyKey(parentID, m)
	mu := s.remapLock(key)
	mu.Lock()
	defer mu.Unlock()
	used, err := s.remapCopiesInUse(ctx)
	if err != nil {
		log.G(ctx).WithError(err).WithField("copy", key).Warn("failed to tell whether a shifted copy is still used; the next start decides")
		return
	}
	if used[key] {
		return
	}
	s.trashRemapCopy(ctx, key)
}

// remapCopiesInUse names the copies some snapshot stands on, or may: every
// snapshot with a mapping and a parent, whichever its kind (a committed one
// no longer needs its copy, but keeping it until then costs one scan less
// per Commit).
func (s *Snapshotter) remapCopiesInUse(ctx context.Context) (map[string]bool, error) {
	used := map[string]bool{}
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			m, err := remapOf(info.Labels)
			if err != nil || m == nil || info.Parent == "" {
				return nil
			}
			pid, _, _, err := storage.GetInfo(ctx, info.Parent)
			if err != nil {
				return err
			}
			used[remapCopyKey(pid, m)] = true
			return nil
		})
	})
	return used, err
}

func (s *Snapshotter) trashRemapCopy(ctx context.Context, key string) {
	to, err := s.trash(s.remapCopyPath(key))
	if err != nil {
		log.G(ctx).WithError(err).WithField("copy", key).Warn("failed to move an unused shifted copy to the trash")
		return
	}
	if to != "" {
		s.deleteLater(to)
	}
}

// sweepRemapCopies removes, at start, the copies no snapshot needs (a crash
// between a Remove and its release) and builds left unfinished.
func (s *Snapshotter) sweepRemapCopies(ctx context.Context) error {
	entries, err := os.ReadDir(filepath.Join(s.root, remapCopiesDir))
	if os.IsNotExist(err) || (err == nil && len(entries) == 0) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list shifted copies: %w", err)
	}
	used, err := s.remapCopiesInUse(ctx)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !used[e.Name()] {
			s.trashRemapCopy(ctx, e.Name())
		}
	}
	return nil
}
