package snapshotter

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"syscall"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/fileops"
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

// dedupeState is the snapshotter's dedupe: what it may do and the one pass
// at a time it does.
type dedupeState struct {
	mode    DedupeMode // as it runs: off where the root cannot dedupe
	minSize int64
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
	d := &s.dedupe
	d.mode, d.minSize = cfg.Dedupe, cfg.DedupeMinSize
	if d.mode == "" {
		d.mode = DedupeOff
	}
	if d.minSize == 0 {
		d.minSize = DefaultDedupeMinSize
	}
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
	l.WithField("min_size", d.minSize).Info("dedupe of committed layers is on")
	if d.mode == DedupeBackground {
		d.poke = make(chan struct{}, 1)
		d.poke <- struct{}{} // layers committed while it was off
		s.startup.Add(1)
		go s.dedupeWorker(log.WithLogger(s.life, log.G(ctx)))
	}
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
		res, err := s.dedupeLayer(ctx, layerRef{Key: key, ID: id}, nil)
		l := log.G(ctx).WithField("key", key)
		if err != nil {
			l.WithError(err).Warn("dedupe of committed layer failed; overclone dedupe will retry it")
			return
		}
		l.WithField("files", res.Files).WithField("shared_bytes", res.SharedBytes).Debug("layer deduped")
	case DedupeBackground:
		select {
		case s.dedupe.poke <- struct{}{}:
		default: // a pass is already due
		}
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
}

// DedupeSummary sums a pass.
type DedupeSummary struct {
	DryRun      bool  `json:"dry_run"`
	Layers      int   `json:"layers"`
	Files       int   `json:"files"`
	SharedFiles int   `json:"shared_files"`
	SharedBytes int64 `json:"shared_bytes"`
}

type layerRef struct{ Key, ID string }

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
		res, err := s.dedupeLayer(ctx, ref, plan)
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

// undeduped lists the committed layers without a dedupe record, oldest
// (lowest id) first: an image's base is then the copy the others share.
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
			if _, done := ix.record(id); done {
				continue
			}
			_, info, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return err
			}
			if info.Kind == snapshots.KindCommitted {
				refs = append(refs, layerRef{Key: key, ID: id})
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

// hashedFile is a regular file of the layer being deduped.
type hashedFile struct {
	path   string // relative to the layer's fs dir
	size   int64
	blocks int64 // bytes allocated, as the layer's usage counted them
	hash   contentHash
}

// dedupeLayer indexes the layer's files and dedupes each against a copy
// in another committed layer (or an earlier one in the same layer), then
// records the outcome in one write transaction. With plan (a dry run) it
// only looks, and adds the layer's files to plan for the layers after it.
//
// The layer is committed: nothing writes to it, and FIDEDUPERANGE only
// remaps its files to equal bytes, which a container reading it through
// an overlay cannot tell. A file is never trusted to be what the index
// says: the kernel compares, and an entry it finds different is dropped.
func (s *Snapshotter) dedupeLayer(ctx context.Context, ref layerRef, plan map[contentHash][]indexEntry) (DedupeResult, error) {
	res := DedupeResult{Key: ref.Key}
	root, err := os.Open(s.upperPath(ref.ID))
	if err != nil {
		if os.IsNotExist(err) {
			return res, nil // removed since it was listed
		}
		return res, err
	}
	defer root.Close()
	files, err := s.hashLayer(ctx, root)
	if err != nil {
		return res, err
	}
	res.Files = len(files)

	candidates := map[contentHash][]indexEntry{}
	err = transact(ctx, s.ms, false, func(ctx context.Context) error {
		ix, err := openIndex(ctx, false)
		if err != nil {
			return err
		}
		for _, f := range files {
			if _, ok := candidates[f.hash]; ok {
				continue
			}
			hs, err := ix.holders(f.hash)
			if err != nil {
				return err
			}
			hs = slices.DeleteFunc(hs, func(e indexEntry) bool { return e.ID == ref.ID })
			// Sources first: sharing with one of them shares with
			// every layer that already borrows from it.
			sort.SliceStable(hs, func(i, j int) bool { return hs[i].Source == "" && hs[j].Source != "" })
			candidates[f.hash] = append(hs, plan[f.hash]...)
		}
		return nil
	})
	if err != nil {
		return res, err
	}

	others := map[string]*os.File{ref.ID: root}
	defer func() {
		for id, f := range others {
			if id != ref.ID {
				f.Close()
			}
		}
	}()
	var (
		entries []indexEntry
		stale   []indexEntry
	)
	first := map[contentHash]indexEntry{} // this layer's first copy of each content
	for _, f := range files {
		e := indexEntry{Hash: f.hash, ID: ref.ID, Path: f.path, Size: f.size}
		cands := candidates[f.hash]
		if c, ok := first[f.hash]; ok {
			cands = append(slices.Clone(cands), c)
		} else {
			first[f.hash] = e
		}
		for _, c := range cands {
			if c.Size != f.size {
				continue
			}
			if plan != nil {
				e.Borrowed, e.Source = f.blocks, sourceOf(c)
				res.SharedFiles++
				res.SharedBytes += f.size
				break
			}
			shared, differs, err := s.dedupeFile(ctx, others, c, root, f)
			if errors.Is(err, errors.ErrUnsupported) || ctx.Err() != nil {
				return res, err
			}
			if err != nil {
				log.G(ctx).WithError(err).WithField("path", f.path).WithField("with", c.ID+":"+c.Path).Debug("dedupe of file skipped")
				continue
			}
			if differs && shared == 0 {
				log.G(ctx).WithField("layer", c.ID).WithField("path", c.Path).
					Warn("dedupe index entry does not match the file's bytes; dropping it")
				stale = append(stale, c)
				continue
			}
			res.SharedBytes += shared
			if shared == f.size {
				res.SharedFiles++
				e.Borrowed, e.Source = f.blocks, sourceOf(c)
			}
			break
		}
		if first[f.hash].Path == f.path {
			first[f.hash] = e
		}
		entries = append(entries, e)
	}
	if plan != nil {
		for _, e := range entries {
			plan[e.Hash] = append(plan[e.Hash], e)
		}
		return res, nil
	}
	return res, s.update(ctx, func(ctx context.Context) error {
		return recordLayer(ctx, ref, entries, stale)
	})
}

// sourceOf is the layer whose blocks a copy deduped against c shares.
func sourceOf(c indexEntry) string {
	if c.Source != "" {
		return c.Source
	}
	return c.ID
}

// recordLayer writes a layer's entries and record, if it is still the
// committed snapshot the pass started on. It changes nothing but metadata
// and reads everything it decides on in its own transaction, so it may run
// again in another group commit.
func recordLayer(ctx context.Context, ref layerRef, entries, stale []indexEntry) error {
	id, info, _, err := storage.GetInfo(ctx, ref.Key)
	if err != nil || id != ref.ID || info.Kind != snapshots.KindCommitted {
		return nil // removed under the pass: nothing to record
	}
	ix, err := openIndex(ctx, true)
	if err != nil {
		return err
	}
	if _, done := ix.record(ref.ID); done {
		return nil
	}
	for _, st := range stale {
		if !ix.has(st) {
			continue
		}
		if err := ix.delete(st); err != nil {
			return err
		}
		if st.Source != "" {
			if err := ix.addBorrowed(st.ID, -st.Borrowed); err != nil {
				return err
			}
		} else if err := ix.promote(st.Hash, st.ID); err != nil {
			return err
		}
	}
	var rec layerRecord
	for _, e := range entries {
		// A source removed since the pass looked has handed its
		// blocks to another layer, or to nobody: this copy counts
		// its own (at worst counted twice, never not at all).
		if e.Source != "" && !ix.isSource(e.Hash, e.Source) {
			e.Borrowed, e.Source = 0, ""
		}
		if err := ix.put(e); err != nil {
			return err
		}
		rec.Files++
		rec.Borrowed += e.Borrowed
		if e.Source != "" {
			rec.Shared += e.Size
		}
	}
	return ix.done.Put([]byte(ref.ID), rec.value())
}

// isSource reports whether layer id holds content h as a source.
func (ix dedupeIndex) isSource(h contentHash, id string) bool {
	hs, err := ix.holders(h)
	if err != nil {
		return false
	}
	for _, e := range hs {
		if e.ID == id && e.Source == "" {
			return true
		}
	}
	return false
}

// hashLayer lists the layer's regular files of at least the minimum size,
// each inode once, with the SHA-256 of their content. Files are opened by
// descriptor beneath the layer's root, never through a symlink; overlay
// metacopy files (metadata only, their data is in a lower layer) are
// left out.
func (s *Snapshotter) hashLayer(ctx context.Context, root *os.File) ([]hashedFile, error) {
	type inode struct{ dev, ino uint64 }
	seen := map[inode]bool{}
	var files []hashedFile
	buf := make([]byte, 1<<20)
	err := filepath.WalkDir(root.Name(), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		rel, err := filepath.Rel(root.Name(), path)
		if err != nil {
			return err
		}
		f, err := fileops.OpenBeneath(root, rel)
		if err != nil {
			return err
		}
		defer f.Close()
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			return fmt.Errorf("stat %s: %w", path, err)
		}
		key := inode{uint64(st.Dev), st.Ino}
		if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size < s.dedupe.minSize || seen[key] {
			return nil
		}
		// A metacopy file has no data blocks of its own; only a file
		// with fewer blocks than bytes can be one.
		if st.Blocks*512 < st.Size && isMetacopy(int(f.Fd())) {
			return nil
		}
		seen[key] = true
		h := sha256.New()
		if _, err := io.CopyBuffer(h, io.LimitReader(f, st.Size), buf); err != nil {
			return fmt.Errorf("hash %s: %w", path, err)
		}
		hf := hashedFile{path: rel, size: st.Size, blocks: st.Blocks * 512}
		copy(hf.hash[:], h.Sum(nil))
		files = append(files, hf)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index layer %s: %w", root.Name(), err)
	}
	return files, nil
}

// isMetacopy reports an overlay metacopy file, under either xattr
// namespace overlay may use.
func isMetacopy(fd int) bool {
	for _, name := range []string{"trusted.overlay.metacopy", "user.overlay.metacopy"} {
		if _, err := unix.Fgetxattr(fd, name, nil); err == nil || errors.Is(err, unix.ERANGE) {
			return true
		}
	}
	return false
}

// dedupeFile shares f's extents with those of c's copy, opening both by
// descriptor beneath their layers' roots (others caches the roots).
func (s *Snapshotter) dedupeFile(ctx context.Context, others map[string]*os.File, c indexEntry, root *os.File, f hashedFile) (int64, bool, error) {
	srcRoot, ok := others[c.ID]
	if !ok {
		var err error
		if srcRoot, err = os.Open(s.upperPath(c.ID)); err != nil {
			return 0, false, err // removed since the index was read
		}
		others[c.ID] = srcRoot
	}
	src, err := fileops.OpenBeneath(srcRoot, c.Path)
	if err != nil {
		return 0, false, err
	}
	defer src.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(src.Fd()), &st); err != nil {
		return 0, false, err
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG || st.Size != f.size {
		return 0, true, nil // not the file the index says: as if it differed
	}
	dst, err := fileops.OpenBeneath(root, f.path)
	if err != nil {
		return 0, false, err
	}
	defer dst.Close()
	return fileops.DedupeFiles(ctx, int(src.Fd()), int(dst.Fd()), 0, 0, f.size)
}
