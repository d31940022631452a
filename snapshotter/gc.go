package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	bolt "go.etcd.io/bbolt"
)

// Orphan is something under the root that no snapshot's metadata names,
// which Cleanup (or the next start) deletes.
type Orphan struct {
	// Path is absolute.
	Path string
	// Reason says why it is an orphan.
	Reason string
	// Size is the bytes it holds on disk and Inodes its files (hard
	// links counted once); both zero for a link.
	Size   int64
	Inodes int64
}

// Orphan reasons.
const (
	ReasonNoMetadata = "directory without metadata"
	ReasonCutShort   = "create cut short (or in flight)"
	ReasonStaleLink  = "layer link without metadata"
	ReasonTrash      = "in the trash, not yet deleted"
)

// Orphans lists what Cleanup would delete, with sizes, without deleting
// anything: `overclone gc --dry-run` on a running snapshotter. A create in
// flight shows as ReasonCutShort; Cleanup leaves those alone.
func (s *Snapshotter) Orphans(ctx context.Context) ([]Orphan, error) {
	var orphans []Orphan
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		orphans, err = findOrphans(ctx, s.root)
		return err
	})
	if err != nil {
		return nil, err
	}
	return measure(ctx, orphans)
}

// orphansOpenTimeout bounds the wait for the database's lock in
// ListOrphans: a running daemon holds it for as long as it runs, so waiting
// longer never helps.
const orphansOpenTimeout = time.Second

// ListOrphans is Orphans for a root no daemon serves: it opens the metadata
// read-only and fails with a clear message if a daemon holds it.
func ListOrphans(ctx context.Context, root string) ([]Orphan, error) {
	if err := CheckRoot(root); err != nil {
		return nil, err
	}
	ms, err := storage.NewMetaStore(dbPath(root), func(o *bolt.Options) error {
		o.ReadOnly = true
		o.Timeout = orphansOpenTimeout
		return nil
	})
	if err != nil {
		return nil, err
	}
	defer ms.Close()
	var orphans []Orphan
	err = ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		orphans, err = findOrphans(ctx, root)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read metadata in %s (a running daemon holds it: stop it first): %w", root, err)
	}
	return measure(ctx, orphans)
}

// findOrphans lists, inside a transaction, the snapshot and flattened
// layer directories and layer links the metadata does not name, and the
// trash.
func findOrphans(ctx context.Context, root string) ([]Orphan, error) {
	ids, err := idMap(ctx)
	if err != nil {
		return nil, err
	}
	var orphans []Orphan
	// The same directories trashOrphans sweeps.
	for _, dir := range []string{snapshotsDir, flatDir} {
		entries, err := os.ReadDir(filepath.Join(root, dir))
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", dir, err)
		}
		for _, e := range entries {
			if _, ok := ids[e.Name()]; ok {
				continue
			}
			reason := ReasonNoMetadata
			if strings.HasPrefix(e.Name(), "new-") {
				reason = ReasonCutShort
			}
			orphans = append(orphans, Orphan{Path: filepath.Join(root, dir, e.Name()), Reason: reason})
		}
	}
	short := make(map[string]bool, len(ids))
	for id := range ids {
		short[shortName(id)] = true
	}
	links, err := os.ReadDir(filepath.Join(root, linksDir))
	if err != nil {
		return nil, fmt.Errorf("list layer links: %w", err)
	}
	for _, l := range links {
		if !short[l.Name()] {
			orphans = append(orphans, Orphan{Path: filepath.Join(root, linksDir, l.Name()), Reason: ReasonStaleLink})
		}
	}
	trash, err := os.ReadDir(filepath.Join(root, trashDir))
	if err != nil {
		return nil, fmt.Errorf("list the trash: %w", err)
	}
	for _, e := range trash {
		orphans = append(orphans, Orphan{Path: filepath.Join(root, trashDir, e.Name()), Reason: ReasonTrash})
	}
	return orphans, nil
}

// measure fills in sizes, outside any transaction: a walk of a big orphan
// must not hold the metadata. Something deleted meanwhile (the trash
// empties in the background) is dropped from the list.
func measure(ctx context.Context, orphans []Orphan) ([]Orphan, error) {
	out := orphans[:0]
	for _, o := range orphans {
		if o.Reason != ReasonStaleLink {
			du, err := fs.DiskUsage(ctx, o.Path)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("measure %s: %w", o.Path, err)
			}
			o.Size, o.Inodes = du.Size, du.Inodes
		}
		out = append(out, o)
	}
	return out, nil
}
