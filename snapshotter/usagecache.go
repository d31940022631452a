package snapshotter

import (
	"context"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// A polled Usage of an unlimited active snapshot is a walk of its whole
// upper (1.1-1.4 s of CPU for 100k files, every call), and CRI asks for
// every container's every 10 s. With usage_max_age a poll may be answered
// from a walk at most that old: 30 s answers three polls in four from the
// last walk. It is off by default, so that a figure is as fresh as the
// built-in's unless the operator chooses otherwise (the kubelet's eviction
// reads it). A limited snapshot needs no cache: its image's counters cost
// two syscalls.

// WithUsageMaxAge sets how stale a polled Usage of an unlimited active
// snapshot may be; 0 walks on every call, as containerd's built-in does.
func WithUsageMaxAge(d time.Duration) Opt {
	return func(c *Config) error {
		c.UsageMaxAge = d
		return nil
	}
}

// usageCache keeps the last walked Usage of each active snapshot for at
// most maxAge. Concurrent calls for one snapshot share one walk. Commit
// never reads it (a committed layer's usage is walked fresh), and Remove
// drops the snapshot's entry.
type usageCache struct {
	maxAge time.Duration
	mu     sync.Mutex
	byID   map[string]*usageEntry
}

type usageEntry struct {
	done  chan struct{} // closed when the walk that fills it ends
	at    time.Time     // when that walk started
	usage snapshots.Usage
	err   error
}

// get returns id's usage from a walk that started at most maxAge ago, or
// walks now.
func (c *usageCache) get(ctx context.Context, id string, walk func() (snapshots.Usage, error)) (snapshots.Usage, error) {
	if c.maxAge <= 0 {
		return walk()
	}
	now := time.Now()
	c.mu.Lock()
	e, ok := c.byID[id]
	if !ok || now.Sub(e.at) > c.maxAge {
		e = &usageEntry{done: make(chan struct{}), at: now}
		if c.byID == nil {
			c.byID = map[string]*usageEntry{}
		}
		c.byID[id] = e
		c.mu.Unlock()
		e.usage, e.err = walk()
		close(e.done)
		if e.err != nil {
			c.forget(id, e)
		}
		return e.usage, e.err
	}
	c.mu.Unlock()
	select {
	case <-e.done:
		return e.usage, e.err
	case <-ctx.Done():
		return snapshots.Usage{}, ctx.Err()
	}
}

// drop forgets id, whose snapshot is gone.
func (c *usageCache) drop(id string) {
	c.mu.Lock()
	delete(c.byID, id)
	c.mu.Unlock()
}

// forget drops e if it is still id's entry: a failed walk is not kept.
func (c *usageCache) forget(id string, e *usageEntry) {
	c.mu.Lock()
	if c.byID[id] == e {
		delete(c.byID, id)
	}
	c.mu.Unlock()
}

// UsageMechanism says how Usage of an active snapshot is answered, for the
// start-up log and `overclone check`.
func UsageMechanism(limits LimitMechanism, maxAge time.Duration) string {
	walk := "unlimited snapshots: a walk of the upper on every call"
	if maxAge > 0 {
		walk = "unlimited snapshots: a walk of the upper, reused for up to " + maxAge.String()
	}
	if !limits.OK {
		return walk
	}
	if limits.Backend == LimitQgroup {
		return "limited snapshots: their btrfs qgroup's counters (bytes, never stale) and the last search of their subvolume's tree (inodes: counted again in the background when the tree changed, at most every " + recountInterval(maxAge).String() + ", so up to that plus one count behind), no walk; " + walk
	}
	return "limited snapshots: statfs of their image (no walk); " + walk
}
