package snapshotter

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

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
// repaired by fsck, an operator's rm) and marks them unusable. It must run
// inside a transaction.
func (s *Snapshotter) checkLayers(ctx context.Context) error {
	ids, err := idMap(ctx)
	if err != nil {
		return err
	}
	for id, key := range ids {
		if _, err := os.Stat(s.upperPath(id)); err != nil {
			log.G(ctx).WithError(err).WithField("key", key).WithField("id", id).Error("snapshot directory is missing: the snapshot is unusable, remove it and pull its image again")
			s.missing.add(id, key)
			continue
		}
		s.missing.drop(id)
	}
	return nil
}
