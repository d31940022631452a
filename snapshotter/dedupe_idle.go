package snapshotter

import (
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
)

// dedupeIdleDelay is how long after the last Commit, with no layer being
// unpacked, the idle worker starts on the small files. An image's layers
// follow each other within milliseconds, and each unpack holds an
// "extract-" snapshot while it writes; the delay covers the gap between
// one Commit and the next layer's Prepare.
const dedupeIdleDelay = time.Second

// idleGate tells the idle dedupe worker when no unpack is under way.
//
// With dedupe_commit_min_size above dedupe_min_size, most of the files of
// a layer (most of an image's files are a block or two) but few of its
// bytes are left to a worker: each costs a remap transaction in the
// filesystem's log, which inside Commit made the unpack 1.5x slower.
// Run alongside an unpack they would take the same CPU and log from it, so
// the worker waits until containerd's unpacker holds no extraction
// snapshot (the keys it makes with snapshots.UnpackKeyFormat) and no
// Commit has run for dedupeIdleDelay.
type idleGate struct {
	mu      sync.Mutex
	unpacks map[string]bool // extraction snapshots prepared, not yet committed or removed
	last    time.Time       // the last Commit, or unpack Prepare
}

// isUnpack reports a key containerd's unpacker makes for a layer it is
// extracting. Through containerd the key arrives behind the metadata
// store's "<namespace>/<seq>/" (userKey).
func isUnpack(key string) bool {
	return strings.HasPrefix(userKey(key), snapshots.UnpackKeyPrefix+"-")
}

// prepare notes an active snapshot being made.
func (g *idleGate) prepare(key string) {
	if !isUnpack(key) {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.unpacks == nil {
		g.unpacks = map[string]bool{}
	}
	g.unpacks[key] = true
	g.last = time.Now()
}

// done notes that active snapshot key was committed, removed or never
// made; commit says a Commit ran.
func (g *idleGate) done(key string, commit bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.unpacks, key)
	if commit {
		g.last = time.Now()
	}
}

// quietFor is how long the worker must still wait (0: idle now).
func (g *idleGate) quietFor(now time.Time) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.unpacks) > 0 {
		return dedupeIdleDelay
	}
	return max(dedupeIdleDelay-now.Sub(g.last), 0)
}

// wait returns once the gate is idle, or when ctx ends.
func (g *idleGate) wait(ctx context.Context) error {
	for {
		d := g.quietFor(time.Now())
		if d == 0 {
			return nil
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// idleDedupeHook, when set before New, is called after each layer the
// idle worker did: tests wait on it rather than on time.
var idleDedupeHook func(DedupeResult)

// idleDedupeWorker dedupes, layer by layer and only while no unpack is
// under way, the files Commit left: those below dedupe_commit_min_size,
// and every file of a layer whose Commit did not dedupe it. A Commit that
// comes while it is on a layer waits for that layer only (dedupe's mutex).
func (s *Snapshotter) idleDedupeWorker(ctx context.Context) {
	defer s.startup.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.dedupe.poke:
		}
		tried := map[string]bool{} // once each per wake-up: a layer may be left unrecorded
		for {
			if s.dedupe.idle.wait(ctx) != nil {
				return
			}
			res, more, err := s.dedupeNext(ctx, tried)
			if err != nil {
				if ctx.Err() == nil {
					log.G(ctx).WithError(err).Warn("idle dedupe failed; the next Commit retries it")
				}
				break
			}
			if !more {
				break
			}
			log.G(ctx).WithField("key", res.Key).WithField("files", res.Files).
				WithField("shared_bytes", res.SharedBytes).Debug("layer's smaller files deduped")
			if idleDedupeHook != nil {
				idleDedupeHook(res)
			}
		}
	}
}

// dedupeNext dedupes the oldest layer a pass has not covered and that is
// not in tried, and adds it there; more is false when there was none.
func (s *Snapshotter) dedupeNext(ctx context.Context, tried map[string]bool) (res DedupeResult, more bool, err error) {
	s.dedupe.mu.Lock()
	defer s.dedupe.mu.Unlock()
	todo, err := s.undeduped(ctx)
	if err != nil {
		return res, false, err
	}
	todo = slices.DeleteFunc(todo, func(r layerRef) bool { return tried[r.ID] })
	if len(todo) == 0 {
		return res, false, nil
	}
	ref := todo[0]
	tried[ref.ID] = true
	res, err = s.dedupeLayer(ctx, ref, sizeRange{lo: s.dedupe.minSize, hi: ref.Hi}, nil)
	return res, err == nil, err
}
