package snapshotter

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	bolt "go.etcd.io/bbolt"
)

// The dedupe index lives in overclone's bucket of the metadata database,
// beside containerd's, so that a layer's entries go in the same transaction
// as its metadata (Remove) and no crash can leave one without the other:
//
//	overclone/dedupe-files/<hash><id>\x00<path>  size, borrowed, source id
//	overclone/dedupe-layer/<id>\x00<hash><path>  (empty): a layer's entries
//	overclone/dedupe-done/<id>                     borrowed, files, shared, min size
//	overclone/dedupe-path/<path>\x00<hash><id>     (empty): sources by path
//
// An entry says that committed layer <id> holds a regular file at <path>
// (relative to its fs dir) whose content hashed to <hash> (contentHash). It is a hint,
// never trusted: FIDEDUPERANGE compares the bytes itself and shares nothing
// that differs, and an entry found to differ is dropped.
//
// A rebuilt image holds most of its files at the paths, and with the
// sizes, of the layer it replaces: dedupe-path finds that copy without
// reading the file (see shareByPath). It lists sources only (a copy that
// shares a source's extents adds nothing to try), so it grows with the
// contents a node holds, not with their copies. Layers indexed before it
// existed are found by hash only.
//
// Usage: a layer whose file was deduped against another layer's copy no
// longer counts that file's blocks ("borrowed"); the copy it shares with
// (its "source") does. When the source goes, one of the layers that
// borrowed from it becomes the source and counts the blocks again, in the
// same transaction, so the sum of all layers' Usage stays what the files
// take on disk.
var (
	dedupeFilesBucket = []byte("dedupe-files")
	dedupeLayerBucket = []byte("dedupe-layer")
	dedupeDoneBucket  = []byte("dedupe-done")
	dedupePathBucket  = []byte("dedupe-path")
)

// contentHash names a file's content in the index: its xxHash64 and its
// size. It only has to find candidates cheaply: FIDEDUPERANGE compares the
// bytes, and a candidate that differs is hashed again before its entry is
// dropped, so a collision costs one refused dedupe, never a wrong share
// nor a lost entry. (SHA-256 took 2-4x xxHash64's time here, and hashing
// with it was a third of what dedupe added to a layer's Commit.)
type contentHash [16]byte

// indexEntry is one file of one layer in the index.
type indexEntry struct {
	Hash contentHash
	ID   string // the layer
	Path string // relative to the layer's fs dir
	Size int64
	// Borrowed is what the layer's recorded usage no longer counts for
	// this file, because Source's copy, whose extents it shares, counts
	// them; 0 (and Source "") for a file that counts its own blocks.
	Borrowed int64
	Source   string
}

func (e indexEntry) fileKey() []byte {
	k := make([]byte, 0, len(e.Hash)+len(e.ID)+1+len(e.Path))
	k = append(k, e.Hash[:]...)
	k = append(k, e.ID...)
	k = append(k, 0)
	return append(k, e.Path...)
}

func (e indexEntry) layerKey() []byte {
	k := make([]byte, 0, len(e.ID)+1+len(e.Hash)+len(e.Path))
	k = append(k, e.ID...)
	k = append(k, 0)
	k = append(k, e.Hash[:]...)
	return append(k, e.Path...)
}

func (e indexEntry) pathKey() []byte {
	k := make([]byte, 0, len(e.Path)+1+len(e.Hash)+len(e.ID))
	k = append(k, e.Path...)
	k = append(k, 0)
	k = append(k, e.Hash[:]...)
	return append(k, e.ID...)
}

func (e indexEntry) value() []byte {
	v := make([]byte, 16, 16+len(e.Source))
	binary.BigEndian.PutUint64(v[0:], uint64(e.Size))
	binary.BigEndian.PutUint64(v[8:], uint64(e.Borrowed))
	return append(v, e.Source...)
}

func parseEntry(k, v []byte) (indexEntry, error) {
	var e indexEntry
	if len(k) < len(e.Hash)+2 || len(v) < 16 {
		return e, fmt.Errorf("dedupe index: malformed entry %x", k)
	}
	copy(e.Hash[:], k)
	rest := k[len(e.Hash):]
	i := bytes.IndexByte(rest, 0)
	if i < 1 {
		return e, fmt.Errorf("dedupe index: malformed entry %x", k)
	}
	e.ID, e.Path = string(rest[:i]), string(rest[i+1:])
	e.Size = int64(binary.BigEndian.Uint64(v[0:]))
	e.Borrowed = int64(binary.BigEndian.Uint64(v[8:]))
	e.Source = string(v[16:])
	return e, nil
}

// layerRecord says a layer went through dedupe, and what came of it.
type layerRecord struct {
	Borrowed int64 // bytes its usage no longer counts
	Files    int64 // files indexed
	Shared   int64 // bytes of its files shared with another copy
	// MinSize is the smallest file size the layer's passes covered:
	// a Commit that leaves the small files to the worker records its
	// own threshold (dedupe_commit_min_size), and the worker's pass
	// over the rest lowers it. 0 (a record written before it existed)
	// covers every size.
	MinSize int64
}

func (r layerRecord) value() []byte {
	v := make([]byte, 32)
	binary.BigEndian.PutUint64(v[0:], uint64(r.Borrowed))
	binary.BigEndian.PutUint64(v[8:], uint64(r.Files))
	binary.BigEndian.PutUint64(v[16:], uint64(r.Shared))
	binary.BigEndian.PutUint64(v[24:], uint64(r.MinSize))
	return v
}

func parseRecord(v []byte) layerRecord {
	if len(v) < 24 {
		return layerRecord{}
	}
	r := layerRecord{
		Borrowed: int64(binary.BigEndian.Uint64(v[0:])),
		Files:    int64(binary.BigEndian.Uint64(v[8:])),
		Shared:   int64(binary.BigEndian.Uint64(v[16:])),
	}
	if len(v) >= 32 {
		r.MinSize = int64(binary.BigEndian.Uint64(v[24:]))
	}
	return r
}

// covers reports whether the layer's passes covered every file of at
// least minSize bytes.
func (r layerRecord) covers(minSize int64) bool {
	return r.MinSize <= minSize
}

// dedupeIndex is the index's buckets in one transaction; in a read-only
// transaction on a root that never deduped, they are nil and read as empty.
type dedupeIndex struct {
	files, layers, done, paths *bolt.Bucket
}

func openIndex(ctx context.Context, write bool) (dedupeIndex, error) {
	tx, err := boltTx(ctx)
	if err != nil {
		return dedupeIndex{}, err
	}
	top := tx.Bucket(overcloneBucket)
	if top == nil {
		if !write {
			return dedupeIndex{}, nil
		}
		if top, err = tx.CreateBucketIfNotExists(overcloneBucket); err != nil {
			return dedupeIndex{}, err
		}
	}
	var ix dedupeIndex
	for _, b := range []struct {
		name []byte
		to   **bolt.Bucket
	}{{dedupeFilesBucket, &ix.files}, {dedupeLayerBucket, &ix.layers}, {dedupeDoneBucket, &ix.done}, {dedupePathBucket, &ix.paths}} {
		*b.to = top.Bucket(b.name)
		if *b.to == nil && write {
			if *b.to, err = top.CreateBucket(b.name); err != nil {
				return dedupeIndex{}, fmt.Errorf("create dedupe index: %w", err)
			}
		}
	}
	return ix, nil
}

// holders returns every entry with content h.
func (ix dedupeIndex) holders(h contentHash) ([]indexEntry, error) {
	if ix.files == nil {
		return nil, nil
	}
	var out []indexEntry
	c := ix.files.Cursor()
	for k, v := c.Seek(h[:]); k != nil && bytes.HasPrefix(k, h[:]); k, v = c.Next() {
		e, err := parseEntry(k, v)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

func (ix dedupeIndex) record(id string) (layerRecord, bool) {
	if ix.done == nil {
		return layerRecord{}, false
	}
	v := ix.done.Get([]byte(id))
	if v == nil {
		return layerRecord{}, false
	}
	return parseRecord(v), true
}

// borrowed is what layer id's usage no longer counts.
func (ix dedupeIndex) borrowed(id string) int64 {
	r, _ := ix.record(id)
	return r.Borrowed
}

// atPath returns the entries of files at path with size bytes.
func (ix dedupeIndex) atPath(path string, size int64) ([]indexEntry, error) {
	if ix.paths == nil {
		return nil, nil
	}
	prefix := append([]byte(path), 0)
	var out []indexEntry
	c := ix.paths.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		rest := k[len(prefix):]
		if len(rest) <= len(contentHash{}) {
			return nil, fmt.Errorf("dedupe index: malformed path entry %x", k)
		}
		e := indexEntry{Path: path, ID: string(rest[len(contentHash{}):])}
		copy(e.Hash[:], rest)
		if int64(binary.BigEndian.Uint64(e.Hash[8:])) != size {
			continue
		}
		v := ix.files.Get(e.fileKey())
		if v == nil {
			continue // a path entry outlived its file entry: only a hint
		}
		e, err := parseEntry(e.fileKey(), v)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

func (ix dedupeIndex) put(e indexEntry) error {
	if err := ix.files.Put(e.fileKey(), e.value()); err != nil {
		return err
	}
	if e.Source == "" {
		if err := ix.paths.Put(e.pathKey(), nil); err != nil {
			return err
		}
	}
	return ix.layers.Put(e.layerKey(), nil)
}

func (ix dedupeIndex) has(e indexEntry) bool {
	return ix.files != nil && ix.files.Get(e.fileKey()) != nil
}

func (ix dedupeIndex) delete(e indexEntry) error {
	if err := ix.files.Delete(e.fileKey()); err != nil {
		return err
	}
	if ix.paths != nil {
		if err := ix.paths.Delete(e.pathKey()); err != nil {
			return err
		}
	}
	return ix.layers.Delete(e.layerKey())
}

// entries lists layer id's entries.
func (ix dedupeIndex) entries(id string) ([]indexEntry, error) {
	if ix.layers == nil {
		return nil, nil
	}
	prefix := append([]byte(id), 0)
	var out []indexEntry
	c := ix.layers.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		rest := k[len(prefix):]
		if len(rest) < len(contentHash{}) {
			return nil, fmt.Errorf("dedupe index: malformed layer entry %x", k)
		}
		var e indexEntry
		copy(e.Hash[:], rest)
		e.ID, e.Path = id, string(rest[len(contentHash{}):])
		v := ix.files.Get(e.fileKey())
		if v == nil {
			return nil, fmt.Errorf("dedupe index: layer %s lists %s, which has no entry", id, e.Path)
		}
		e, err := parseEntry(e.fileKey(), v)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// dropLayer takes layer id out of the index, in the transaction that
// removes its metadata. For every content it was the source of, the first
// layer that borrowed it from id becomes its source and counts its blocks
// again; the others now borrow from that one.
func dropLayer(ctx context.Context, id string) error {
	ix, err := openIndex(ctx, false)
	if err != nil || ix.done == nil {
		return err
	}
	gone, err := ix.entries(id)
	if err != nil {
		return err
	}
	sources := map[contentHash]bool{}
	for _, e := range gone {
		if err := ix.delete(e); err != nil {
			return fmt.Errorf("drop dedupe entries of layer %s: %w", id, err)
		}
		if e.Source == "" {
			sources[e.Hash] = true
		}
	}
	if err := ix.done.Delete([]byte(id)); err != nil {
		return fmt.Errorf("drop dedupe record of layer %s: %w", id, err)
	}
	for h := range sources {
		if err := ix.promote(h, id); err != nil {
			return err
		}
	}
	return nil
}

// promote moves the borrowers of content h from source gone to a new one.
func (ix dedupeIndex) promote(h contentHash, gone string) error {
	holders, err := ix.holders(h)
	if err != nil {
		return err
	}
	heir := ""
	for _, e := range holders {
		if e.Source != gone {
			continue
		}
		if heir == "" {
			heir = e.ID
			if err := ix.addBorrowed(e.ID, -e.Borrowed); err != nil {
				return err
			}
			e.Borrowed, e.Source = 0, ""
			if ix.paths != nil {
				if err := ix.paths.Put(e.pathKey(), nil); err != nil {
					return err
				}
			}
		} else {
			e.Source = heir
		}
		if err := ix.files.Put(e.fileKey(), e.value()); err != nil {
			return err
		}
	}
	return nil
}

func (ix dedupeIndex) addBorrowed(id string, delta int64) error {
	r, ok := ix.record(id)
	if !ok {
		return fmt.Errorf("dedupe index: layer %s has entries but no record", id)
	}
	r.Borrowed = max(r.Borrowed+delta, 0)
	return ix.done.Put([]byte(id), r.value())
}

// recordLayer writes a layer's entries and record, if it is still the
// committed snapshot the pass started on. It changes nothing but metadata
// and reads everything it decides on in its own transaction, so it may run
// again in another group commit. A pass over the files below a record's
// MinSize (rng.hi) adds its entries to the record's and lowers MinSize to
// rng.lo; its entries are other sizes than the record's, so other keys.
func recordLayer(ctx context.Context, ref layerRef, rng sizeRange, entries, stale []indexEntry) error {
	id, info, _, err := storage.GetInfo(ctx, ref.Key)
	if err != nil || id != ref.ID || info.Kind != snapshots.KindCommitted {
		return nil // removed under the pass: nothing to record
	}
	ix, err := openIndex(ctx, true)
	if err != nil {
		return err
	}
	rec, done := ix.record(ref.ID)
	if done && (rng.hi == 0 || rec.MinSize != rng.hi) {
		return nil // done already, by another pass than the one that read it
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
	if done {
		rec, _ = ix.record(ref.ID) // as the stale entries left it
	}
	rec.MinSize = rng.lo
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

// pruneIndex drops the index's layers that the metadata no longer has: a
// root served for a while by an overclone that did not know the index
// removed layers without dropping their entries, and the layers that
// borrowed from them must count their blocks again.
func pruneIndex(ctx context.Context) error {
	gone, err := goneLayers(ctx)
	if err != nil {
		return err
	}
	for _, id := range gone {
		if err := dropLayer(ctx, id); err != nil {
			return err
		}
	}
	return nil
}

// goneLayers lists the layers the index has and the metadata does not.
func goneLayers(ctx context.Context) ([]string, error) {
	ix, err := openIndex(ctx, false)
	if err != nil || ix.done == nil {
		return nil, err
	}
	ids, err := idMap(ctx)
	if err != nil {
		return nil, err
	}
	var gone []string
	err = ix.done.ForEach(func(k, _ []byte) error {
		if _, ok := ids[string(k)]; !ok {
			gone = append(gone, string(k))
		}
		return nil
	})
	return gone, err
}
