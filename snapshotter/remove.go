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
// directory is then moved into the trash and deleted there, both in the
// background.
//
// The order is what keeps a crash harmless: after the transaction the
// directory has no metadata and Cleanup (or the next start) removes it;
// renaming it away before the transaction committed could leave metadata
// that names a directory already gone.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	defer s.dedupe.idle.done(key, false)
	return s.remove(ctx, key, "")
}

// remove removes key, if it is snapshot want (any snapshot if want is "");
// if key is another snapshot it returns NotFound.
func (s *Snapshotter) remove(ctx context.Context, key, want string) error {
	var (
		id      string
		release *remapRelease // the shifted copy it stood on (remap_copy.go)
	)
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
		release = s.remapReleaseOf(ctx, key)
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
	s.usages.drop(id)
	s.quotas.forget(s.snapshotDir(id))
	s.linked.Delete(id)
	s.deepActives.Delete(id)
	if err := os.Remove(s.linkPath(id)); err != nil && !os.IsNotExist(err) {
		log.G(ctx).WithError(err).WithField("id", id).Warn("failed to remove layer link")
	}
	// A size-limited snapshot's image is unmounted before its directory
	// (the image file in it) can be renamed into the trash.
	if err := detachImage(ctx, s.snapshotDir(id)); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("failed to unmount removed snapshot's image: Cleanup will retry")
	}
	// The snapshot's flattened layer, if a deep stack made one, is used
	// only by snapshots standing on it, and there are none left. Both go
	// to the trash from the deleter's workers: the metadata is gone, so
	// the caller need not wait for a rename (the built-in's asynchronous
	// Remove touches nothing but the metadata either).
	for _, dir := range []string{s.snapshotDir(id), s.flatPath(id)} {
		s.deletions.move(dir, s.trashPath(dir))
	}
	if release != nil {
		s.releaseRemapCopy(ctx, release.parentID, release.m)
	}
	return nil
}

// Cleanup takes what the metadata does not name out of the snapshotter's
// directories and returns without waiting for the disk.
//
// It renames each orphan directory into ROOT/trash and removes each stale
// link. So once Cleanup returns, nothing that was under snapshots/, flat/
// or l/ when it was called lacks metadata but the new-* of creates still
// in flight; everything else it found is in the trash. It holds no write
// transaction: see the order in the code.
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
	// The directories are listed before the metadata is read, and the
	// metadata in a read transaction, as the built-in does: no writer
	// waits for a Cleanup and it costs no fdatasync. That order is what
	// keeps it safe. A snapshot's directory and its layer link are only
	// ever made after its metadata is committed (creates place theirs
	// after their transaction, links are made for committed parents), so
	// whatever the listing found, a later read of the metadata names, or
	// the snapshot was removed since.
	found, err := s.listRoot()
	if err != nil {
		return err
	}
	var ids map[string]string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err = idMap(ctx)
		return err
	}); err != nil {
		return err
	}
	// Taken after the metadata is read: a create the read saw is being
	// placed now, or was placed, and then it is either in the listing
	// or looked at again before it is called missing.
	inFlight := s.placing.all()
	if err := s.detachOrphanImages(ctx, ids, found); err != nil {
		return err
	}
	placed, err := s.trashOrphans(ctx, ids, found, false)
	if err != nil {
		return err
	}
	for id := range inFlight {
		placed[id] = true
	}
	if err := s.checkLayers(ctx, ids, placed, false); err != nil {
		return err
	}
	// Anything a failed deletion left in the trash is queued again;
	// the deleter drops what it already holds.
	s.emptyTrash(ctx)
	return nil
}

// recover runs at start, before any call is served: it also removes the
// temporary directories of creates that were cut short and reports
// snapshots whose directories are gone, or makes them again.
func (s *Snapshotter) recover(ctx context.Context) error {
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		found, err := s.listRoot()
		if err != nil {
			return err
		}
		ids, err := idMap(ctx)
		if err != nil {
			return err
		}
		if err := s.detachOrphanImages(ctx, ids, found); err != nil {
			return err
		}
		placed, err := s.trashOrphans(ctx, ids, found, true)
		if err != nil {
			return err
		}
		if err := s.checkLayers(ctx, ids, placed, true); err != nil {
			return err
		}
		return s.reattachImages(ctx, ids)
	})
	if err != nil {
		return fmt.Errorf("recover %s: %w", s.root, err)
	}
	s.emptyTrash(ctx)
	s.cleanStaging(ctx)
	return nil
}

// rootListing is what Cleanup and the start find in the directories that
// hold one entry per snapshot.
type rootListing struct {
	dirs  map[string][]string // snapshots/ and flat/: entry names
	links []string            // l/
}

func (s *Snapshotter) listRoot() (rootListing, error) {
	found := rootListing{dirs: map[string][]string{}}
	for _, dir := range []string{snapshotsDir, flatDir, linksDir} {
		f, err := os.Open(filepath.Join(s.root, dir))
		if err != nil {
			return found, fmt.Errorf("list %s: %w", dir, err)
		}
		names, err := f.Readdirnames(-1)
		f.Close()
		if err != nil {
			return found, fmt.Errorf("list %s: %w", dir, err)
		}
		if dir == linksDir {
			found.links = names
		} else {
			found.dirs[dir] = names
		}
	}
	return found, nil
}

// trashOrphans moves to the trash what found holds that no snapshot in ids
// owns, and returns the ids whose directory found holds in snapshots/. ids
// must be read after found was listed (see Cleanup).
func (s *Snapshotter) trashOrphans(ctx context.Context, ids map[string]string, found rootListing, starting bool) (placed map[string]bool, err error) {
	placed = map[string]bool{}
	for _, dir := range []string{snapshotsDir, flatDir} {
		for _, name := range found.dirs[dir] {
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
			if path := filepath.Join(s.root, dir, name); s.deletions.moving(path) {
				// A Remove queued it and its move is still in the
				// queue: taken here, with nothing to say.
				log.G(ctx).WithField("path", filepath.Join(dir, name)).Debug("trashing removed snapshot's directory ahead of the deleter")
			} else {
				log.G(ctx).WithField("path", filepath.Join(dir, name)).Info("removing directory that no snapshot owns")
			}
			if _, err := s.trash(filepath.Join(s.root, dir, name)); err != nil {
				return nil, err
			}
		}
	}

	short := make(map[string]string, len(ids))
	for id := range ids {
		short[shortName(id)] = id
	}
	for _, name := range found.links {
		if _, ok := short[name]; ok {
			continue
		}
		// *.new-* are links being made by ensureLink, unless nothing
		// is running yet.
		if strings.Contains(name, ".new-") && !starting {
			continue
		}
		if n, err := strconv.ParseUint(name, 36, 64); err == nil {
			s.linked.Delete(strconv.FormatUint(n, 10))
		}
		if err := os.Remove(filepath.Join(s.root, linksDir, name)); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("remove stale layer link %s: %w", name, err)
		}
	}
	return placed, nil
}

var trashSeq atomic.Uint64

// trashPath names a place in the trash for dir that nothing else uses.
func (s *Snapshotter) trashPath(dir string) string {
	name := filepath.Base(dir) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36) + "-" + strconv.FormatUint(trashSeq.Add(1), 36)
	return filepath.Join(s.root, trashDir, name)
}

// trash renames dir into ROOT/trash under a name nothing else uses and
// returns where it went, or "" if dir did not exist.
func (s *Snapshotter) trash(dir string) (string, error) {
	to := s.trashPath(dir)
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
