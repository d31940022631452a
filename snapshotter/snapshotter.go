package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
)

// dbOpenTimeout bounds how long start-up waits for bolt's file lock: a second
// daemon on the same root must fail with a clear message, not hang.
const dbOpenTimeout = 5 * time.Second

// Config is what the functional options set.
type Config struct {
	// MountOptions are appended verbatim to every overlay mount.
	MountOptions []string
	// Volatile adds overlay's "volatile" to active snapshots' mounts: no
	// syncs on the upper, for throw-away containers.
	Volatile bool
	// SyncOnCommit makes Commit return only once the layer is on disk.
	SyncOnCommit bool
	// Features overrides what the kernel probe found (tests use it).
	Features *Features
}

// Opt configures a snapshotter.
type Opt func(*Config) error

// WithMountOptions appends options to every overlay mount.
func WithMountOptions(options []string) Opt {
	return func(c *Config) error {
		c.MountOptions = append(c.MountOptions, options...)
		return nil
	}
}

// WithVolatile mounts active snapshots with overlay's volatile option.
func WithVolatile(c *Config) error {
	c.Volatile = true
	return nil
}

// WithSyncOnCommit makes Commit durable.
func WithSyncOnCommit(sync bool) Opt {
	return func(c *Config) error {
		c.SyncOnCommit = sync
		return nil
	}
}

// WithFeatures replaces the kernel probe.
func WithFeatures(f Features) Opt {
	return func(c *Config) error {
		c.Features = &f
		return nil
	}
}

// Snapshotter implements snapshots.Snapshotter and snapshots.Cleaner.
type Snapshotter struct {
	root     string
	ms       *storage.MetaStore
	options  []string // overlay options for every overlay mount
	volatile bool
	syncs    bool
	missing  missingSet // snapshots whose directory is gone: refused

	// removals counts background deletions of trashed directories, so
	// that Close can wait for them.
	removals sync.WaitGroup
	closeMu  sync.Mutex
	closed   bool
}

var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

// New opens (or creates) a snapshotter rooted at root.
func New(ctx context.Context, root string, opts ...Opt) (*Snapshotter, error) {
	var cfg Config
	for _, opt := range opts {
		if err := opt(&cfg); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create root %s: %w", root, err)
	}
	// The root holds every image's files: nobody but root may walk it.
	if err := os.Chmod(root, 0o700); err != nil {
		return nil, fmt.Errorf("restrict root %s: %w", root, err)
	}
	dtype, err := fs.SupportsDType(root)
	if err != nil {
		return nil, fmt.Errorf("check d_type on %s: %w", root, err)
	}
	if !dtype {
		return nil, fmt.Errorf("%s does not support d_type, which overlay needs (an xfs root must be formatted with ftype=1)", root)
	}
	for _, dir := range []string{snapshotsDir, linksDir, trashDir} {
		if err := os.Mkdir(filepath.Join(root, dir), 0o700); err != nil && !os.IsExist(err) {
			return nil, fmt.Errorf("create %s: %w", dir, err)
		}
	}

	features := cfg.Features
	if features == nil {
		f := probeFeatures(ctx, root)
		features = &f
	}

	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"), func(o *bolt.Options) error {
		o.Timeout = dbOpenTimeout
		return nil
	})
	if err != nil {
		return nil, err
	}
	s := &Snapshotter{
		root:     root,
		ms:       ms,
		options:  features.overlayOptions(cfg.MountOptions),
		volatile: cfg.Volatile,
		syncs:    cfg.SyncOnCommit,
	}
	// MetaStore opens the file lazily; open it now so that a root held by
	// another daemon fails here, with a message, and not on the first call.
	if err := ms.WithTransaction(ctx, false, func(context.Context) error { return nil }); err != nil {
		return nil, fmt.Errorf("open metadata in %s (is another overclone using this root?): %w", root, err)
	}
	if err := s.recover(ctx); err != nil {
		ms.Close()
		return nil, err
	}
	log.G(ctx).WithField("root", root).WithField("options", s.options).Info("overclone snapshotter ready")
	return s, nil
}

// Close waits for background removals and closes the metadata store. It
// may be called more than once.
func (s *Snapshotter) Close() error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	s.removals.Wait()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.ms.Close()
}

// Root returns the directory the snapshotter keeps everything under.
func (s *Snapshotter) Root() string { return s.root }

const (
	snapshotsDir = "snapshots"
	linksDir     = "l"
	trashDir     = "trash"
)

func (s *Snapshotter) snapshotDir(id string) string {
	return filepath.Join(s.root, snapshotsDir, id)
}

func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.root, snapshotsDir, id, "fs")
}

func (s *Snapshotter) workPath(id string) string {
	return filepath.Join(s.root, snapshotsDir, id, "work")
}

// linkPath is the short name a committed layer is known by in lowerdir=.
// Base 36 keeps it to three characters for the first 46656 snapshots, so
// 500 layers compact (containerd's core/mount chdirs to ROOT/l) to about
// 2 KiB of options, where ROOT/snapshots/<id>/fs needs twice that.
func (s *Snapshotter) linkPath(id string) string {
	return filepath.Join(s.root, linksDir, shortName(id))
}

func shortName(id string) string {
	n, err := strconv.ParseUint(id, 10, 64)
	if err != nil {
		// IDs come from bolt sequences; anything else is kept as is.
		return id
	}
	return strconv.FormatUint(n, 36)
}
