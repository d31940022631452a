package snapshotter

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// missingSet holds the ids of snapshots whose directory was gone when the
// metadata was last checked against the disk (at start and in Cleanup).
//
// Such a snapshot must not be handed out: an overlay over a lower that is
// not there fails to mount at best and, for an upper, silently starts a
// container on an empty layer. Refusing it with FailedPrecondition tells
// containerd (and the operator) that the image must be pulled again; the
// metadata is kept, so that nothing disappears without anyone noticing.
type missingSet struct {
	mu  sync.RWMutex
	ids map[string]string // id -> key, for messages
	// n is len(ids), read without the lock: the set is empty on every
	// healthy node, and check is on the path of every Prepare and Mounts.
	n atomic.Int32
}

func (m *missingSet) add(id, key string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ids == nil {
		m.ids = map[string]string{}
	}
	m.ids[id] = key
	m.n.Store(int32(len(m.ids)))
}

func (m *missingSet) drop(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.ids, id)
	m.n.Store(int32(len(m.ids)))
}

// check returns a FailedPrecondition error naming the first of ids whose
// directory is missing.
func (m *missingSet) check(ids ...string) error {
	if m.n.Load() == 0 {
		return nil
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, id := range ids {
		if key, ok := m.ids[id]; ok {
			return fmt.Errorf("snapshot %q (id %s) is unusable: its directory is missing from disk; remove it and pull its image again: %w", key, id, errdefs.ErrFailedPrecondition)
		}
	}
	return nil
}

// Missing returns the keys of the snapshots found without their directory,
// by id.
func (s *Snapshotter) Missing() map[string]string {
	s.missing.mu.RLock()
	defer s.missing.mu.RUnlock()
	out := make(map[string]string, len(s.missing.ids))
	for id, key := range s.missing.ids {
		out[id] = key
	}
	return out
}

// checkLayers says loudly which snapshots lost their directory (a disk
// repaired by fsck, an operator's rm) and marks them unusable. At start it
// first makes again the directories of active snapshots and views that a
// power cut took before their rename reached the disk (see durable.go);
// committed layers cannot be made again. Snapshots being placed right now
// are not missing. ids is the metadata's, placed the ids whose directory
// is in snapshots/ or on its way there: Cleanup goes by that listing,
// which costs no call per snapshot on a node with thousands; the start
// looks into each for its fs dir too. At start it must run inside a write
// transaction; Cleanup runs it in none, and looks again at what it would
// call missing, as the listing is older than the metadata it read.
func (s *Snapshotter) checkLayers(ctx context.Context, ids map[string]string, placed map[string]bool, starting bool) error {
	var lost []string
	for id := range ids {
		there := placed[id]
		switch {
		case there && starting:
			_, err := os.Stat(s.upperPath(id))
			there = err == nil
		case !there && !starting:
			there = s.notMissing(ctx, id, ids[id])
		}
		if !there {
			lost = append(lost, id)
			continue
		}
		s.missing.drop(id)
	}
	// Parents first: a view or an active is made again only on parents
	// that are there.
	slices.SortFunc(lost, func(a, b string) int { return cmpID(a, b) })
	for _, id := range lost {
		key := ids[id]
		if starting {
			made, err := s.recreate(ctx, key)
			if err != nil {
				log.G(ctx).WithError(err).WithField("key", key).WithField("id", id).Error("failed to make again the directory of a snapshot")
			}
			if made {
				log.G(ctx).WithField("key", key).WithField("id", id).Warn("snapshot directory was missing (a power cut before its rename reached the disk, or removed by hand): made again as its metadata describes it")
				continue
			}
		}
		log.G(ctx).WithField("key", key).WithField("id", id).Error("snapshot directory is missing: the snapshot is unusable, remove it and pull its image again")
		s.missing.add(id, key)
	}
	return nil
}

// notMissing says whether snapshot id, which Cleanup's listing did not
// find, is there after all (placed since the listing) or gone from the
// metadata since it was read (removed: its directory went after its
// metadata).
func (s *Snapshotter) notMissing(ctx context.Context, id, key string) bool {
	if _, err := os.Lstat(s.snapshotDir(id)); err == nil {
		return true
	}
	var still bool
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		now, _, _, err := storage.GetInfo(ctx, key)
		still = err == nil && now == id
		return nil
	})
	return err != nil || !still // unsure: the next Cleanup looks again
}

// cmpID orders snapshot ids as the numbers they are, so that a parent
// (always created before its children) comes first.
func cmpID(a, b string) int {
	if len(a) != len(b) {
		return len(a) - len(b)
	}
	return strings.Compare(a, b)
}

// recreate makes again the directory of the active snapshot or view key,
// as Prepare or View made it; it reports false for a committed snapshot,
// whose files cannot be made again.
func (s *Snapshotter) recreate(ctx context.Context, key string) (bool, error) {
	_, info, _, err := storage.GetInfo(ctx, key)
	if err != nil || info.Kind == snapshots.KindCommitted {
		return false, err
	}
	snap, err := storage.GetSnapshot(ctx, key)
	if err != nil {
		return false, err
	}
	if err := s.missing.check(snap.ParentIDs...); err != nil {
		return false, err
	}
	var size int64
	if limited(info) {
		size, _, _ = parseMaxSize(info.Labels)
	}
	td, err := s.prepareLimitDir(snap.Kind, size)
	if err != nil {
		return false, err
	}
	defer removeTree(td) // gone after the rename, unless it failed
	// A limited snapshot's image or subvolume went with the lost
	// rename: a new one.
	var img *loopImage
	if size > 0 {
		if img, err = s.prepareLimit(ctx, td, size); err != nil {
			return false, err
		}
		defer img.close()
	}
	idmap, err := s.recreatedMapping(ctx, snap, info)
	if err != nil {
		return false, err
	}
	materialized := s.mode == ModeUserspace && snap.Kind == snapshots.KindActive && len(snap.ParentIDs) > 0
	if materialized {
		if err := s.materialize(ctx, snap.ParentIDs[0], td, idmap); err != nil {
			return false, err
		}
	}
	if idmap == nil {
		err = s.ownUpper(snap, td)
	} else {
		err = s.remapPrepared(td, idmap, materialized)
	}
	if err != nil {
		return false, err
	}
	if err := s.syncPrepared(td); err != nil {
		return false, err
	}
	if err := s.placeDirectory(ctx, td, snap); err != nil {
		return false, err
	}
	if img != nil {
		if err := img.attach(s.snapshotDir(snap.ID)); err != nil {
			return false, err
		}
	}
	return true, nil
}
