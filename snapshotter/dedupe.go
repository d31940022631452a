package snapshotter

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/overclone/overclone/overlayutil"
)

// DedupeMode says when committed layers are deduplicated.
type DedupeMode string

const (
	// DedupeOff never shares extents between layers.
	DedupeOff DedupeMode = "off"
	// DedupeCommit dedupes a layer in its Commit, after the write
	// transaction that records it: Commit returns once it is done.
	DedupeCommit DedupeMode = "commit"
	// DedupeBackground dedupes committed layers in the background, one
	// at a time, and at start those committed while it was not running.
	DedupeBackground DedupeMode = "background"
)

// DefaultDedupeMinSize is the smallest file dedupe indexes. A file of a
// block or two saves at most that much, costs an index entry and a
// FIDEDUPERANGE, and btrfs keeps the smallest ones inline in its metadata
// where there is no extent to share; most of an image's bytes are in
// larger files.
const DefaultDedupeMinSize = 16 << 10

// ParseDedupe checks a dedupe mode from the configuration.
func ParseDedupe(s string) (DedupeMode, error) {
	switch m := DedupeMode(s); m {
	case DedupeOff, DedupeCommit, DedupeBackground:
		return m, nil
	case "":
		return DedupeOff, nil
	}
	return "", fmt.Errorf("dedupe %q: want off, commit or background: %w", s, errdefs.ErrInvalidArgument)
}

// WithDedupe shares extents between identical files of committed layers,
// at Commit or in the background, for files of at least minSize bytes (0:
// DefaultDedupeMinSize). Where the filesystem under the root cannot dedupe
// (ext4, tmpfs), it stays off with a log line.
func WithDedupe(mode DedupeMode, minSize int64) Opt {
	return func(c *Config) error {
		m, err := ParseDedupe(string(mode))
		if err != nil {
			return err
		}
		if minSize < 0 {
			return fmt.Errorf("dedupe_min_size %d must not be negative: %w", minSize, errdefs.ErrInvalidArgument)
		}
		c.Dedupe, c.DedupeMinSize = m, minSize
		return nil
	}
}

// WithDedupeCommitMinSize splits "commit" mode's work: Commit dedupes the
// files of at least n bytes itself, and leaves the smaller ones (down to
// the dedupe minimum size) to a worker that runs once no layer is being
// unpacked (dedupe_idle.go). 0, or n not above the minimum size, dedupes
// every file in Commit.
func WithDedupeCommitMinSize(n int64) Opt {
	return func(c *Config) error {
		if n < 0 {
			return fmt.Errorf("dedupe_commit_min_size %d must not be negative: %w", n, errdefs.ErrInvalidArgument)
		}
		c.DedupeCommitMinSize = n
		return nil
	}
}

// dedupeState is the snapshotter's dedupe: what it may do and the one pass
// at a time it does.
type dedupeState struct {
	mode    DedupeMode // as it runs: off where the root cannot dedupe
	minSize int64
	// commitMin is the smallest file a Commit dedupes in "commit" mode;
	// above minSize, the worker does the files between them when idle.
	commitMin int64
	idle      idleGate
	// unable says why the root cannot dedupe at all ("" if it can):
	// `overclone dedupe` is refused with it.
	unable string
	// mu makes passes one at a time: two layers deduped at once could
	// each miss the other's copy, and the index is read before and
	// written after the FIDEDUPERANGE calls.
	mu   sync.Mutex
	poke chan struct{} // background mode: wakes the worker
}

// setupDedupe decides whether dedupe runs, says so, and starts the
// background worker. It runs in New, after recovery.
func (s *Snapshotter) setupDedupe(ctx context.Context, cfg Config, f *overlayutil.Features) {
	// Looked for in a read transaction: most starts find nothing, and
	// need no write.
	var gone []string
	err := transact(ctx, s.ms, false, func(ctx context.Context) (err error) {
		gone, err = goneLayers(ctx)
		return err
	})
	if err == nil && len(gone) > 0 {
		err = s.update(ctx, pruneIndex)
	}
	if err != nil {
		log.G(ctx).WithError(err).Warn("failed to drop the dedupe index entries of removed layers")
	}
	d := &s.dedupe
	d.mode, d.minSize = cfg.Dedupe, cfg.DedupeMinSize
	if d.mode == "" {
		d.mode = DedupeOff
	}
	if d.minSize == 0 {
		d.minSize = DefaultDedupeMinSize
	}
	d.commitMin = max(cfg.DedupeCommitMinSize, d.minSize)
	switch {
	case s.mode == ModeUserspace:
		d.unable = "userspace mode keeps whole views reflinked from their parents, and their usage counts only what they do not share with them; dedupe is for overlay mode"
	case !f.OK(overlayutil.CheckDedupe):
		d.unable = "the filesystem under the root cannot share extents: " + f.Get(overlayutil.CheckDedupe).Reason
	}
	l := log.G(ctx).WithField("dedupe", d.mode)
	if d.unable != "" {
		if d.mode != DedupeOff {
			l.WithField("reason", d.unable).Info("dedupe is off")
		}
		d.mode = DedupeOff
		return
	}
	if d.mode == DedupeOff {
		return
	}
	if d.split() {
		l = l.WithField("commit_min_size", d.commitMin)
	}
	l.WithField("min_size", d.minSize).Info("dedupe of committed layers is on")
	switch {
	case d.mode == DedupeBackground:
		d.poke = make(chan struct{}, 1)
		d.poke <- struct{}{} // layers committed while it was off
		s.startup.Add(1)
		go s.dedupeWorker(log.WithLogger(s.life, log.G(ctx)))
	case d.split():
		d.poke = make(chan struct{}, 1)
		d.poke <- struct{}{} // the small files of layers committed before it stopped
		s.startup.Add(1)
		go s.idleDedupeWorker(log.WithLogger(s.life, log.G(ctx)))
	}
}

// split reports whether Commit leaves the smaller files to the idle worker.
func (d *dedupeState) split() bool {
	return d.mode == DedupeCommit && d.commitMin > d.minSize
}

// DedupeMode returns the dedupe mode the snapshotter runs in.
func (s *Snapshotter) DedupeMode() DedupeMode { return s.dedupe.mode }

// afterCommit is Commit's hook, run once the layer's metadata is
// committed (and, with sync_on_commit, its data on disk). A dedupe that
// fails is logged, never returned: the Commit has happened, and the layer
// is left for the next pass.
func (s *Snapshotter) afterCommit(ctx context.Context, key, id string) {
	switch s.dedupe.mode {
	case DedupeCommit:
		s.dedupe.mu.Lock()
		defer s.dedupe.mu.Unlock()
		defer s.pokeDedupe() // the idle worker, for the smaller files
		res, err := s.dedupeLayer(ctx, layerRef{Key: key, ID: id}, sizeRange{lo: s.dedupe.commitMin}, nil)
		l := log.G(ctx).WithField("key", key)
		if err != nil {
			l.WithError(err).Warn("dedupe of committed layer failed; overclone dedupe will retry it")
			return
		}
		l.WithField("files", res.Files).WithField("shared_bytes", res.SharedBytes).
			WithField("by_path", res.byPath).WithField("by_path_files", res.pathFiles).WithField("hash", res.hashed).WithField("share", res.shared).WithField("record", res.recorded).Debug("layer deduped")
	case DedupeBackground:
		s.pokeDedupe()
	}
}

// pokeDedupe wakes the worker, if there is one.
func (s *Snapshotter) pokeDedupe() {
	if s.dedupe.poke == nil {
		return
	}
	select {
	case s.dedupe.poke <- struct{}{}:
	default: // a pass is already due
	}
}

func (s *Snapshotter) dedupeWorker(ctx context.Context) {
	defer s.startup.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.dedupe.poke:
		}
		sum, err := s.Dedupe(ctx, false, nil)
		if err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Warn("background dedupe failed")
		} else if sum.Layers > 0 {
			log.G(ctx).WithField("layers", sum.Layers).WithField("shared_bytes", sum.SharedBytes).Debug("background dedupe")
		}
	}
}

// DedupeResult is what a dedupe pass did to one layer, or would do.
type DedupeResult struct {
	Key         string `json:"key"`
	Files       int    `json:"files"`        // files indexed
	SharedFiles int    `json:"shared_files"` // files that now share another layer's extents
	SharedBytes int64  `json:"shared_bytes"` // their bytes
	Done        int    `json:"done"`         // layers done so far in this pass
	Total       int    `json:"total"`        // layers in this pass

	// Where the time went, for the debug log: the files shared with a
	// copy at their path (shareByPath), hashing the others and looking
	// them up, their FIDEDUPERANGE, the index's transaction.
	byPath, hashed, shared, recorded time.Duration
	// pathFiles is how many files shareByPath shared, unread.
	pathFiles int
}

// DedupeSummary sums a pass.
type DedupeSummary struct {
	DryRun      bool  `json:"dry_run"`
	Layers      int   `json:"layers"`
	Files       int   `json:"files"`
	SharedFiles int   `json:"shared_files"`
	SharedBytes int64 `json:"shared_bytes"`
}

// layerRef is a layer a pass is to do: every file of at least the minimum
// size, or, when Hi is not 0, those below Hi (its record's MinSize).
type layerRef struct {
	Key, ID string
	Hi      int64
}

// Dedupe runs a pass over every committed layer not deduped yet (the
// layers committed before dedupe was on, or whose dedupe was cut short),
// oldest first, calling progress after each. With dryRun it changes
// nothing and reports what would be shared with the layers already indexed
// and with each other. It is refused where the root cannot dedupe.
func (s *Snapshotter) Dedupe(ctx context.Context, dryRun bool, progress func(DedupeResult)) (DedupeSummary, error) {
	sum := DedupeSummary{DryRun: dryRun}
	if s.dedupe.unable != "" {
		return sum, fmt.Errorf("dedupe: %s: %w", s.dedupe.unable, errdefs.ErrFailedPrecondition)
	}
	s.dedupe.mu.Lock()
	defer s.dedupe.mu.Unlock()
	todo, err := s.undeduped(ctx)
	if err != nil {
		return sum, err
	}
	var plan map[contentHash][]indexEntry
	if dryRun {
		plan = map[contentHash][]indexEntry{}
	}
	for i, ref := range todo {
		res, err := s.dedupeLayer(ctx, ref, sizeRange{lo: s.dedupe.minSize, hi: ref.Hi}, plan)
		if err != nil {
			return sum, fmt.Errorf("dedupe layer %q: %w", ref.Key, err)
		}
		res.Done, res.Total = i+1, len(todo)
		sum.Layers++
		sum.Files += res.Files
		sum.SharedFiles += res.SharedFiles
		sum.SharedBytes += res.SharedBytes
		if progress != nil {
			progress(res)
		}
	}
	return sum, nil
}

// undeduped lists the committed layers without a dedupe record, or whose
// record does not cover files down to the minimum size, oldest (lowest id)
// first: an image's base is then the copy the others share.
func (s *Snapshotter) undeduped(ctx context.Context) ([]layerRef, error) {
	var refs []layerRef
	err := transact(ctx, s.ms, false, func(ctx context.Context) error {
		ids, err := idMap(ctx)
		if err != nil {
			return err
		}
		ix, err := openIndex(ctx, false)
		if err != nil {
			return err
		}
		for id, key := range ids {
			var hi int64
			if rec, done := ix.record(id); done {
				if rec.covers(s.dedupe.minSize) {
					continue
				}
				hi = rec.MinSize
			}
			_, info, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return err
			}
			if info.Kind == snapshots.KindCommitted {
				refs = append(refs, layerRef{Key: key, ID: id, Hi: hi})
			}
		}
		return nil
	})
	sort.Slice(refs, func(i, j int) bool { return idLess(refs[i].ID, refs[j].ID) })
	return refs, err
}

func idLess(a, b string) bool {
	x, errA := strconv.ParseUint(a, 10, 64)
	y, errB := strconv.ParseUint(b, 10, 64)
	if errA != nil || errB != nil {
		return a < b
	}
	return x < y
}
