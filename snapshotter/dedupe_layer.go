package snapshotter

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/fileops"
)

// dedupeWorkers is how many files of a layer are hashed, and deduped, at
// once. A FIDEDUPERANGE of a small file on xfs is mostly waiting (for
// the inode locks, the log reservations of the remap and of the reference
// counts), not CPU: measured on a 2-core machine, 3000 small files took
// 3.9 s one at a time and 0.95 s four at a time.
const dedupeWorkers = 4

// maxCandidates bounds the copies a file is tried against: a common file
// may be in hundreds of layers, and a copy that cannot be shared (btrfs
// keeps small files inline, where there is no extent) fails the same way
// with every other.
const maxCandidates = 3

// hashedFile is a regular file of the layer being deduped.
type hashedFile struct {
	path   string // relative to the layer's fs dir
	size   int64
	blocks int64 // bytes allocated, as the layer's usage counted them
	hash   contentHash
}

// shareOutcome is what dedupe did with one file.
type shareOutcome struct {
	entry  indexEntry   // the file's index entry, Source set if it shares
	shared int64        // bytes now shared
	stale  []indexEntry // entries the kernel found different
	fatal  error        // stops the pass (cancelled, filesystem cannot)
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
func (s *Snapshotter) dedupeLayer(ctx context.Context, ref layerRef, rng sizeRange, plan map[contentHash][]indexEntry) (DedupeResult, error) {
	res := DedupeResult{Key: ref.Key}
	root, err := os.Open(s.upperPath(ref.ID))
	if err != nil {
		if os.IsNotExist(err) {
			return res, nil // removed since it was listed
		}
		return res, err
	}
	defer root.Close()
	roots := &rootCache{s: s, open: map[string]*os.File{ref.ID: root}}
	defer roots.close(ref.ID)
	began := time.Now()
	files, err := listLayer(ctx, root, rng)
	if err != nil {
		return res, err
	}
	var byPath []shareOutcome
	if plan == nil { // a dry run has no kernel to tell it a path's copy is equal
		if byPath, files, err = s.shareByPath(ctx, roots, root, ref.ID, files, rng); err != nil {
			return res, err
		}
	}
	res.byPath = time.Since(began)
	res.pathFiles = len(byPath)
	if files, err = hashFiles(root, files, rng); err != nil {
		return res, err
	}
	res.Files = len(byPath) + len(files)
	candidates, err := s.candidates(ctx, ref.ID, files, plan)
	if err != nil {
		return res, err
	}
	res.hashed = time.Since(began) - res.byPath
	// The first copy of each content in this layer goes first; copies
	// of it in the same layer follow once it is done, so that they share
	// the extents it ends up with, not the ones it gave up.
	outcomes := make([]shareOutcome, len(files))
	first := map[contentHash]int{}
	var firsts, dups []int
	for i, f := range files {
		if _, ok := first[f.hash]; ok {
			dups = append(dups, i)
			continue
		}
		first[f.hash] = i
		firsts = append(firsts, i)
	}
	share := func(i int) {
		f := files[i]
		cands := candidates[f.hash]
		if j, ok := first[f.hash]; ok && j != i {
			cands = append(slices.Clone(cands), outcomes[j].entry)
		}
		outcomes[i] = s.shareFile(ctx, roots, root, ref.ID, f, cands, plan != nil)
	}
	for _, phase := range [][]int{firsts, dups} {
		parallel(phase, share)
	}
	res.shared = time.Since(began) - res.byPath - res.hashed

	var entries, stale []indexEntry
	for _, o := range append(byPath, outcomes...) {
		if o.fatal != nil {
			return res, o.fatal
		}
		entries = append(entries, o.entry)
		stale = append(stale, o.stale...)
		res.SharedBytes += o.shared
		if o.entry.Source != "" {
			res.SharedFiles++
		}
	}
	if plan != nil {
		for _, e := range entries {
			plan[e.Hash] = append(plan[e.Hash], e)
		}
		return res, nil
	}
	// The record must not outlive the remaps it counts, or after a power
	// cut the layer would stop counting blocks it no longer shares. The
	// remaps are other inodes' transactions in xfs's log, which bolt's
	// fdatasync of its own file forces only when that file has metadata
	// of its own to log (blocks to allocate): one syncfs forces it
	// (TestDedupeSurvivesShutdown/recorded). Without sync_on_commit the
	// layer itself is not made durable either.
	if s.syncs && res.SharedFiles > 0 {
		if err := syncFilesystem(root.Name()); err != nil {
			return res, err
		}
	}
	err = s.update(ctx, func(ctx context.Context) error {
		return recordLayer(ctx, ref, rng, entries, stale)
	})
	res.recorded = time.Since(began) - res.byPath - res.hashed - res.shared
	return res, err
}

// parallel calls fn for each of items, dedupeWorkers at a time.
func parallel(items []int, fn func(int)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(dedupeWorkers, len(items)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				fn(i)
			}
		}()
	}
	for _, i := range items {
		next <- i
	}
	close(next)
	wg.Wait()
}

// candidates looks up, in one read transaction, the copies in other
// layers of each content the layer holds (and, in a dry run, those the
// layers before it in the pass would have indexed), sources first:
// sharing with a source shares with every layer that borrows from it.
func (s *Snapshotter) candidates(ctx context.Context, id string, files []hashedFile, plan map[contentHash][]indexEntry) (map[contentHash][]indexEntry, error) {
	out := map[contentHash][]indexEntry{}
	err := transact(ctx, s.ms, false, func(ctx context.Context) error {
		ix, err := openIndex(ctx, false)
		if err != nil {
			return err
		}
		for _, f := range files {
			if _, ok := out[f.hash]; ok {
				continue
			}
			hs, err := ix.holders(f.hash)
			if err != nil {
				return err
			}
			hs = slices.DeleteFunc(hs, func(e indexEntry) bool { return e.ID == id })
			sort.SliceStable(hs, func(i, j int) bool { return hs[i].Source == "" && hs[j].Source != "" })
			hs = append(hs, plan[f.hash]...)
			out[f.hash] = hs[:min(len(hs), maxCandidates)]
		}
		return nil
	})
	return out, err
}

// shareFile dedupes one file against the first candidate that takes it.
// In a dry run it only finds that candidate.
func (s *Snapshotter) shareFile(ctx context.Context, roots *rootCache, root *os.File, id string, f hashedFile, cands []indexEntry, dry bool) shareOutcome {
	o := shareOutcome{entry: indexEntry{Hash: f.hash, ID: id, Path: f.path, Size: f.size}}
	for _, c := range cands {
		if c.Size != f.size {
			continue
		}
		if dry {
			o.entry.Borrowed, o.entry.Source = f.blocks, sourceOf(c)
			o.shared = f.size
			return o
		}
		shared, differs, err := s.dedupeFile(ctx, roots, c, root, f)
		if errors.Is(err, errors.ErrUnsupported) || ctx.Err() != nil {
			o.fatal = errors.Join(err, ctx.Err())
			return o
		}
		if err != nil {
			log.G(ctx).WithError(err).WithField("path", f.path).WithField("with", c.ID+":"+c.Path).Debug("dedupe of file skipped")
			continue
		}
		if differs && shared == 0 {
			// Two contents with one hash, or an entry that lies:
			// only the second is dropped.
			if !s.stillHashes(roots, c) {
				log.G(ctx).WithField("layer", c.ID).WithField("path", c.Path).
					Warn("dedupe index entry does not match the file's bytes; dropping it")
				o.stale = append(o.stale, c)
			}
			continue
		}
		o.shared = shared
		if shared == f.size {
			o.entry.Borrowed, o.entry.Source = f.blocks, sourceOf(c)
		}
		return o
	}
	return o
}

// stillHashes reports whether c's file still has the content its entry
// names.
func (s *Snapshotter) stillHashes(roots *rootCache, c indexEntry) bool {
	root, err := roots.get(c.ID)
	if err != nil {
		return true // removed: its entries go with it
	}
	f, err := fileops.OpenBeneath(root, c.Path)
	if err != nil {
		return false
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return false
	}
	h, err := hashContent(f, fi.Size())
	return err == nil && h == c.Hash
}

// sourceOf is the layer whose blocks a copy deduped against c shares.
func sourceOf(c indexEntry) string {
	if c.Source != "" {
		return c.Source
	}
	return c.ID
}

// rootCache holds the other layers' roots open for one layer's pass.
type rootCache struct {
	s    *Snapshotter
	mu   sync.Mutex
	open map[string]*os.File
}

func (r *rootCache) get(id string) (*os.File, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if f, ok := r.open[id]; ok {
		return f, nil
	}
	f, err := os.Open(r.s.upperPath(id))
	if err != nil {
		return nil, err // removed since the index was read
	}
	r.open[id] = f
	return f, nil
}

// close closes every root but keep's, which its caller closes.
func (r *rootCache) close(keep string) {
	for id, f := range r.open {
		if id != keep {
			f.Close()
		}
	}
}

// sizeRange is the file sizes a pass covers: at least lo bytes, and less
// than hi unless hi is 0.
type sizeRange struct{ lo, hi int64 }

func (r sizeRange) has(size int64) bool {
	return size >= r.lo && (r.hi == 0 || size < r.hi)
}

// listLayer lists the layer's regular files with sizes in rng (as lstat
// sees them: hashFile and shareByPath check again on the file they open),
// each inode once.
func listLayer(ctx context.Context, root *os.File, rng sizeRange) ([]hashedFile, error) {
	type inode struct{ dev, ino uint64 }
	seen := map[inode]bool{}
	var files []hashedFile
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
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		key := inode{uint64(st.Dev), st.Ino}
		if !rng.has(st.Size) || seen[key] {
			return nil
		}
		seen[key] = true
		rel, err := filepath.Rel(root.Name(), path)
		if err != nil {
			return err
		}
		files = append(files, hashedFile{path: rel, size: st.Size})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index layer %s: %w", root.Name(), err)
	}
	return files, nil
}

// hashFiles fills in the contentHash of files, opened by descriptor
// beneath the layer's root, never through a symlink, and leaves out overlay
// metacopy files (metadata only, their data is in a lower layer) and what
// is no longer a regular file with a size in rng.
func hashFiles(root *os.File, files []hashedFile, rng sizeRange) ([]hashedFile, error) {
	errs := make([]error, len(files))
	keep := make([]bool, len(files))
	idx := make([]int, len(files))
	for i := range idx {
		idx[i] = i
	}
	parallel(idx, func(i int) {
		keep[i], errs[i] = hashFile(root, &files[i], rng)
	})
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("index layer %s: %w", root.Name(), err)
	}
	out := files[:0]
	for i, f := range files {
		if keep[i] {
			out = append(out, f)
		}
	}
	return out, nil
}

// hashFile opens f beneath root and fills in its size, blocks and hash;
// it reports false for what is not to be indexed after all.
func hashFile(root *os.File, f *hashedFile, rng sizeRange) (bool, error) {
	file, ok, err := openIndexable(root, f, rng)
	if !ok || err != nil {
		return false, err
	}
	defer file.Close()
	if f.hash, err = hashContent(file, f.size); err != nil {
		return false, fmt.Errorf("hash %s: %w", f.path, err)
	}
	return true, nil
}

// openIndexable opens f beneath root and fills in its size and blocks; it
// reports false (and no file) for what is not to be indexed after all.
func openIndexable(root *os.File, f *hashedFile, rng sizeRange) (*os.File, bool, error) {
	file, err := fileops.OpenBeneath(root, f.path)
	if err != nil {
		return nil, false, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(file.Fd()), &st); err != nil {
		file.Close()
		return nil, false, fmt.Errorf("stat %s: %w", f.path, err)
	}
	// A metacopy file has no data blocks of its own; only a file with
	// fewer blocks than bytes can be one.
	if st.Mode&unix.S_IFMT != unix.S_IFREG || !rng.has(st.Size) ||
		st.Blocks*512 < st.Size && isMetacopy(int(file.Fd())) {
		file.Close()
		return nil, false, nil
	}
	f.size, f.blocks = st.Size, st.Blocks*512
	return file, true, nil
}

// hashContent is the contentHash of the first size bytes of f, read from
// its start.
func hashContent(f *os.File, size int64) (contentHash, error) {
	var h contentHash
	d := xxhash.New()
	if _, err := io.Copy(d, io.NewSectionReader(f, 0, size)); err != nil {
		return h, err
	}
	binary.BigEndian.PutUint64(h[:8], d.Sum64())
	binary.BigEndian.PutUint64(h[8:], uint64(size))
	return h, nil
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
// descriptor beneath their layers' roots.
func (s *Snapshotter) dedupeFile(ctx context.Context, roots *rootCache, c indexEntry, root *os.File, f hashedFile) (int64, bool, error) {
	dst, err := fileops.OpenBeneath(root, f.path)
	if err != nil {
		return 0, false, err
	}
	defer dst.Close()
	return dedupeInto(ctx, roots, c, dst, f.size)
}

// dedupeInto shares the first size bytes of dst, open, with c's copy,
// opened by descriptor beneath its layer's root.
func dedupeInto(ctx context.Context, roots *rootCache, c indexEntry, dst *os.File, size int64) (int64, bool, error) {
	srcRoot, err := roots.get(c.ID)
	if err != nil {
		return 0, false, err
	}
	src, err := fileops.OpenBeneath(srcRoot, c.Path)
	if err != nil {
		return 0, false, err
	}
	defer src.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(src.Fd()), &st); err != nil {
		return 0, false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size != size {
		return 0, true, nil // not the file the index says: as if it differed
	}
	return fileops.DedupeFiles(ctx, int(src.Fd()), int(dst.Fd()), 0, 0, size)
}
