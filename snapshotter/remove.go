package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Remove drops a snapshot. The metadata goes first, in one transaction; the
// directory is then renamed into the trash and deleted in the background.
//
// The order is what keeps a crash harmless: after the transaction the
// directory has no metadata and Cleanup (or the next start) removes it;
// renaming it away before the transaction committed could leave metadata
// that names a directory already gone.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	return s.remove(ctx, key, "")
}

// remove removes key, if it is snapshot want (any snapshot if want is "");
// if key is another snapshot it returns NotFound.
func (s *Snapshotter) remove(ctx context.Context, key, want string) error {
	var id string
	err := s.update(ctx, func(ctx context.Context) error {
		if want != "" {
			got, _, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return fmt.Errorf("remove snapshot %q: %w", key, err)
			}
			if got != want {
				return fmt.Errorf("remove snapshot %q: not snapshot %s any more: %w", key, want, errdefs.ErrNotFound)
			}
		}
		var err error
		if id, _, err = storage.Remove(ctx, key); err != nil {
			return fmt.Errorf("remove snapshot %q: %w", key, err)
		}
		return dropLayer(ctx, id)
	})
	if err != nil {
		return err
	}
	// A snapshot removed as soon as it was created may not be in place
	// yet: trash it once it is, or it would stay behind as an orphan.
	s.placing.wait(id)
	s.missing.drop(id)
	s.linked.Delete(id)
	if err := os.Remove(s.linkPath(id)); err != nil && !os.IsNotExist(err) {
		log.G(ctx).WithError(err).WithField("id", id).Warn("failed to remove layer link")
	}
	// The snapshot's flattened layer, if a deep stack made one, is used
	// only by snapshots standing on it, and there are none left.
	var trashed []string
	for _, dir := range []string{s.snapshotDir(id), s.flatPath(id)} {
		to, err := s.trash(dir)
		if err != nil {
			// The metadata is gone, so this is no longer the
			// caller's problem: Cleanup will find the directory.
			log.G(ctx).WithError(err).WithField("id", id).Warn("failed to move removed snapshot to the trash")
			continue
		}
		if to != "" {
			trashed = append(trashed, to)
		}
	}
	s.deleteLater(trashed...)
	return nil
}

// Cleanup takes what the metadata does not name out of the snapshotter's
// directories and returns without waiting for the disk.
//
// It holds the write transaction while it lists, so that no snapshot being
// created (its directory placed, its metadata not yet committed) is taken
// for an orphan, and renames each orphan directory into ROOT/trash and
// removes each stale link before the transaction ends. So once Cleanup
// returns, nothing under snapshots/, flat/ or l/ lacks metadata but the
// new-* of creates still in flight; everything else it found is in the
// trash.
//
// Deleting the trash's contents is what it defers, to the background
// deleter, and that is safe: no metadata can name anything in the trash
// (its names are made unique and never read back as ids), so no call can
// reach it and no later create can collide with it; a crash or a stop cut
// short leaves it for the next start, which queues the whole trash again;
// Close waits for it; `overclone gc` waits for it through Collect. Waiting
// here made containerd's garbage collector, and with it `ctr images rm
// --sync` and `crictl rmi`, wait for every file of the image's layers to be
// unlinked: with an 8-layer, 20 000-file image (TestRmiTiming) 1.97-2.54 s,
// 64-84 ms without the wait. The price is that free space read right
// after a collection (statfs: what the kubelet's eviction and image GC
// thresholds read) rises only as the deleter works, about 2 s later for
// that image, while the built-in's (which deletes inside Cleanup with
// containerd's default asynchronous remove) has risen when Cleanup
// returns; the used bytes CRI reports are summed from the remaining
// snapshots' Usage, the same on both.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		return s.sweep(ctx, false)
	}); err != nil {
		return err
	}
	// Anything a failed deletion left in the trash is queued again;
	// the deleter drops what it already holds.
	s.emptyTrash(ctx)
	return nil
}

// recover runs at start, before any call is served: it also removes the
// temporary directories of creates that were cut short and reports
// snapshots whose directories are gone.
func (s *Snapshotter) recover(ctx context.Context) error {
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		return s.sweep(ctx, true)
	})
	if err != nil {
		return fmt.Errorf("recover %s: %w", s.root, err)
	}
	s.emptyTrash(ctx)
	s.cleanStaging(ctx)
	return nil
}

// sweep is what Cleanup and the start do inside their write transaction:
// orphans to the trash, then the snapshots without a directory found. One
// list of the ids and one of snapshots/ serve both.
func (s *Snapshotter) sweep(ctx context.Context, starting bool) error {
	ids, err := idMap(ctx)
	if err != nil {
		return err
	}
	// Taken before the directories are listed: a create whose metadata
	// this transaction sees was being placed by then, or was placed.
	inFlight := s.placing.all()
	placed, err := s.trashOrphans(ctx, ids, starting)
	if err != nil {
		return err
	}
	for id := range inFlight {
		placed[id] = true
	}
	return s.checkLayers(ctx, ids, placed, starting)
}

// trashOrphans moves to the trash what no snapshot in the metadata owns,
// and returns the ids whose directory it found in snapshots/.
// It must run inside a write transaction.
func (s *Snapshotter) trashOrphans(ctx context.Context, ids map[string]string, starting bool) (placed map[string]bool, err error) {
	placed = map[string]bool{}
	for _, dir := range []string{snapshotsDir, flatDir} {
		entries, err := os.ReadDir(filepath.Join(s.root, dir))
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", dir, err)
		}
		for _, e := range entries {
			name := e.Name()
			if _, ok := ids[name]; ok {
				if dir == snapshotsDir {
					placed[name] = true
				}
				continue
			}
			// new-* belong to creates and flattenings in flight,
			// unless nothing is running yet.
			if strings.HasPrefix(name, "new-") && !starting {
				continue
			}
			log.G(ctx).WithField("path", filepath.Join(dir, name)).Info("removing directory that no snapshot owns")
			if _, err := s.trash(filepath.Join(s.root, dir, name)); err != nil {
				return nil, err
			}
		}
	}

	short := make(map[string]string, len(ids))
	for id := range ids {
		short[shortName(id)] = id
	}
	links, err := os.ReadDir(filepath.Join(s.root, linksDir))
	if err != nil {
		return nil, fmt.Errorf("list layer links: %w", err)
	}
	for _, l := range links {
		if _, ok := short[l.Name()]; ok {
			continue
		}
		// *.new-* are links being made by ensureLink, unless nothing
		// is running yet.
		if strings.Contains(l.Name(), ".new-") && !starting {
			continue
		}
		if n, err := strconv.ParseUint(l.Name(), 36, 64); err == nil {
			s.linked.Delete(strconv.FormatUint(n, 10))
		}
		if err := os.Remove(filepath.Join(s.root, linksDir, l.Name())); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("remove stale layer link %s: %w", l.Name(), err)
		}
	}
	return placed, nil
}

var trashSeq atomic.Uint64

// trash renames dir into ROOT/trash under a name nothing else uses and
// returns where it went, or "" if dir did not exist.
func (s *Snapshotter) trash(dir string) (string, error) {
	name := filepath.Base(dir) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36) + "-" + strconv.FormatUint(trashSeq.Add(1), 36)
	to := filepath.Join(s.root, trashDir, name)
	if err := os.Rename(dir, to); err != nil {
		if os.IsNotExist(err) {
			return "", nil
		}
		return "", fmt.Errorf("move %s to the trash: %w", dir, err)
	}
	return to, nil
}

// emptyTrash deletes everything in the trash in the background.
func (s *Snapshotter) emptyTrash(ctx context.Context) {
	dir := filepath.Join(s.root, trashDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		log.G(ctx).WithError(err).Warn("failed to list the trash")
		return
	}
	paths := make([]string, len(entries))
	for i, e := range entries {
		paths[i] = filepath.Join(dir, e.Name())
	}
	s.deleteLater(paths...)
}

// deleteLater deletes paths in the background. Nothing in the trash is
// named by any metadata, so no caller needs to wait for the disk; Close and
// Cleanup do.
func (s *Snapshotter) deleteLater(paths ...string) {
	s.deletions.add(paths...)
}

// idMap is storage.IDMap (id to key) that takes a new, empty database for
// what it is: no snapshots yet.
func idMap(ctx context.Context) (map[string]string, error) {
	ids, err := storage.IDMap(ctx)
	if errdefs.IsNotFound(err) {
		return map[string]string{}, nil
	}
	return ids, err
}
