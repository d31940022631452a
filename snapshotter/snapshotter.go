package snapshotter

import (
	"cmp"
	"context"
	"errors"
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

	"github.com/overclone/overclone/overlayutil"
)

// dbOpenTimeout bounds how long start-up waits for bolt's file lock: a second
// daemon on the same root must fail with a clear message, not hang.
const dbOpenTimeout = 5 * time.Second

// Config is what the functional options set.
type Config struct {
	// Mode is how snapshots are served; auto when empty.
	Mode Mode
	// MountOptions are appended verbatim to every overlay mount.
	MountOptions []string
	// Volatile adds overlay's "volatile" to active snapshots' mounts: no
	// syncs on the upper, for throw-away containers.
	Volatile bool
	// SyncOnCommit makes Commit return only once the layer is on disk.
	SyncOnCommit bool
	// MaxStack caps the layers of one overlay mount; deeper stacks get
	// their bottom layers flattened into one. 0 means as deep as the
	// kernel and the mount options allow.
	MaxStack int
	// Features overrides what the kernel probe found (tests use it).
	Features *overlayutil.Features
	// ExistingRoot refuses a root that holds no metadata database.
	ExistingRoot bool
	// DefaultMaxSize limits containers' active snapshots that carry no
	// max-size label, in bytes; 0 means no limit (see limit.go).
	DefaultMaxSize int64
	// LimitBackend chooses how limits are enforced (qgroup.go); ""
	// is LimitAuto.
	LimitBackend LimitBackend
	// UsageMaxAge is how stale a polled Usage of an unlimited active
	// snapshot may be; 0 walks on every call (see usagecache.go).
	UsageMaxAge time.Duration
	// Dedupe says when committed layers share extents (dedupe.go);
	// DedupeMinSize is the smallest file it indexes.
	// DedupeCommitMinSize, above DedupeMinSize, is the smallest file a
	// Commit dedupes in "commit" mode; an idle worker does the rest.
	Dedupe              DedupeMode
	DedupeMinSize       int64
	DedupeCommitMinSize int64
	// Remap says whether mapped snapshots may use idmapped layers
	// (remap.go); RemapAuto when empty.
	Remap RemapPolicy

	// coverClasses, if not nil, replaces the image pool's covers
	// (imagepool.go): tests keep fewer, or none, to spare filling them.
	coverClasses []int64
}

// Opt configures a snapshotter.
type Opt func(*Config) error

// WithMode sets how snapshots are served.
func WithMode(m Mode) Opt {
	return func(c *Config) error {
		c.Mode = m
		return nil
	}
}

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

// WithMaxStack caps the depth of one overlay mount.
func WithMaxStack(n int) Opt {
	return func(c *Config) error {
		if n < 0 || n == 1 {
			return fmt.Errorf("max_stack %d: want 0 (as deep as the kernel allows) or at least 2", n)
		}
		c.MaxStack = n
		return nil
	}
}

// WithFeatures replaces the kernel probe.
func WithFeatures(f *overlayutil.Features) Opt {
	return func(c *Config) error {
		c.Features = f
		return nil
	}
}

// WithExistingRoot makes New refuse a root that is not one already (no
// metadata database in it) rather than create it: an admin tool handed a
// mistyped --root must say so, not make a new root there and probe it.
func WithExistingRoot(c *Config) error {
	c.ExistingRoot = true
	return nil
}

// Snapshotter implements snapshots.Snapshotter and snapshots.Cleaner.
type Snapshotter struct {
	root     string
	ms       *storage.MetaStore
	mode     Mode
	overlay  overlayutil.Options // shape of every overlay mount
	maxStack int
	syncs    bool
	// defaultMaxSize and limits: how size limits are applied (limit.go).
	defaultMaxSize int64
	limits         LimitMechanism
	quotas         *btrfsQuotas // set on the qgroup path (qgroup.go)
	usages         usageCache
	templates      imageTemplates
	pool           imagePool
	missing        missingSet // snapshots whose directory is gone: refused
	placing        placingSet // snapshots created whose directory is on its way
	batch          batcher    // group commit of the calls' write transactions

	// idmapped: containerd's idmapped lowers work on this root (the
	// idmapped-mounts probe) and the config does not say remap = "copy";
	// remap.go needs them for mapped stacks.
	idmapped bool
	// remapLocks holds a *sync.Mutex per shifted copy, where idmapped is
	// false (remap_copy.go).
	remapLocks sync.Map

	flat flatCache
	// linked remembers the layers whose short link exists (linkLayers),
	// so that mounting a deep stack costs no symlink calls after the
	// first; Remove and Cleanup forget what they delete.
	linked sync.Map

	health healthState
	dedupe dedupeState

	// life ends when the snapshotter is aborted or closed. Work shared
	// between calls (a flattened layer's build) runs under it rather than
	// under any one caller's context, so that it still stops when the
	// daemon does.
	life  context.Context
	abort context.CancelFunc

	// deletions empties the trash in the background; Close and Collect
	// wait for it, Cleanup does not (see Cleanup).
	deletions *deleter
	// startup counts the work New leaves running in the background
	// (cleanStaging). Add is called only in New, before any call is
	// served, so Close may Wait at any time.
	startup sync.WaitGroup
	// deepActives holds the chains of active snapshots whose Commit
	// flattens ahead (preflatten.go).
	deepActives sync.Map
	// background counts work calls leave running (goBackground).
	background sync.WaitGroup
	closeMu    sync.Mutex
	closed     bool
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
	want, err := ParseMode(string(cfg.Mode))
	if err != nil {
		return nil, err
	}
	if cfg.ExistingRoot {
		if err := CheckRoot(root); err != nil {
			return nil, err
		}
	}
	if err := prepareRoot(ctx, root); err != nil {
		return nil, err
	}
	dtype, err := fs.SupportsDType(root)
	if err != nil {
		return nil, fmt.Errorf("check d_type on %s: %w", root, err)
	}
	if !dtype {
		return nil, fmt.Errorf("%s does not support d_type, which overlay needs (an xfs root must be formatted with ftype=1)", root)
	}
	for _, dir := range []string{snapshotsDir, linksDir, flatDir, trashDir, emptyDir} {
		if err := os.Mkdir(filepath.Join(root, dir), 0o700); err != nil && !os.IsExist(err) {
			return nil, fmt.Errorf("create %s: %w", dir, err)
		}
	}

	features := cfg.Features
	if features == nil {
		if features, err = overlayutil.Probe(ctx, root); err != nil {
			return nil, err
		}
	}

	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"), func(o *bolt.Options) error {
		o.Timeout = dbOpenTimeout
		return nil
	})
	if err != nil {
		return nil, err
	}
	overlay := features.BaseOptions()
	overlay.Volatile = cfg.Volatile
	overlay.MountOptions = cfg.MountOptions
	life, abort := context.WithCancel(context.WithoutCancel(ctx))
	s := &Snapshotter{
		life:     life,
		abort:    abort,
		root:     root,
		ms:       ms,
		overlay:  overlay,
		maxStack: cfg.MaxStack,
		syncs:    cfg.SyncOnCommit,
		health:   healthState{reuse: healthReuse},

		deletions: newDeleter(),

		idmapped: features.OK(overlayutil.CheckIDMapped) && cfg.Remap != RemapCopy,
	}
	s.batch.ms = ms
	if s.maxStack == 0 || s.maxStack > overlay.MaxLowers {
		s.maxStack = max(overlay.MaxLowers, 2)
	}
	// MetaStore opens the file lazily; open it now so that a root held by
	// another daemon fails here, with a message, and not on the first call.
	mode, why, err := s.recordMode(ctx, want, features)
	if err != nil {
		abort()
		ms.Close()
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open metadata in %s (is another overclone using this root?): %w", root, err)
		}
		return nil, err
	}
	s.mode = mode
	s.defaultMaxSize = cfg.DefaultMaxSize
	s.limits, s.quotas = probeRootLimits(mode, root, cfg.LimitBackend)
	if s.quotas != nil {
		s.quotas.counts.init(s.life, s.goBackground, recountInterval(cfg.UsageMaxAge))
	}
	s.usages.maxAge = cfg.UsageMaxAge
	s.templates.dir = filepath.Join(root, templatesDir)
	poolFor, covers := s.defaultMaxSize, coverClasses // images are made ready only for the image path
	if s.limits.Backend != LimitImage || reservesWork() != nil {
		poolFor, covers = 0, nil // nor where pooled images cannot be held to a limit
	}
	if cfg.coverClasses != nil {
		covers = cfg.coverClasses
	}
	s.pool.init(&s.templates, poolFor, covers)
	if !s.limits.OK && s.defaultMaxSize > 0 {
		abort()
		ms.Close()
		return nil, fmt.Errorf("default_max_size %d cannot be honoured: %s", s.defaultMaxSize, s.limits.How)
	}
	if err := s.recover(ctx); err != nil {
		abort()
		ms.Close()
		return nil, err
	}
	if err := s.sweepRemapCopies(ctx); err != nil {
		log.G(ctx).WithError(err).Warn("failed to remove unused shifted copies")
	}
	remap, _ := RemapMechanism(mode, features, cfg.Remap)
	s.setupDedupe(ctx, cfg, features)
	log.G(ctx).WithField("root", root).WithField("mode", mode).WithField("why", why).
		WithField("max_stack", s.maxStack).WithField("remap_ids", remap).WithField("remap", cmp.Or(cfg.Remap, RemapAuto)).Info("overclone snapshotter ready")
	logLimits(ctx, s.limits, s.defaultMaxSize)
	s.pool.refill(ctx)
	log.G(ctx).WithField("usage_max_age", cfg.UsageMaxAge).WithField("how", UsageMechanism(s.limits, cfg.UsageMaxAge)).Info("usage of active snapshots")
	return s, nil
}

// prepareRoot creates root 0700 if it does not exist: it holds every
// image's files, and nobody but root may walk it. A root that exists is
// left as it is, with a warning if others can enter it: it may be a
// directory the operator shares on purpose, or one a --root typo named
// (/var/lib), and chmod'ing it would lock everyone else out.
func prepareRoot(ctx context.Context, root string) error {
	fi, err := os.Stat(root)
	if err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("root %s is not a directory", root)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			log.G(ctx).WithField("root", root).WithField("mode", fi.Mode().Perm()).
				Warn("root is open to others: every image's files can be read through it; make it 0700")
		}
		return nil
	}
	if !os.IsNotExist(err) {
		return fmt.Errorf("stat root %s: %w", root, err)
	}
	if err := os.MkdirAll(filepath.Dir(root), 0o700); err != nil {
		return fmt.Errorf("create root %s: %w", root, err)
	}
	// Only a directory this call made is chmod'ed; one another process
	// made in between is someone else's to decide.
	if err := os.Mkdir(root, 0o700); err != nil && !os.IsExist(err) {
		return fmt.Errorf("create root %s: %w", root, err)
	} else if err == nil {
		// Past the umask, on the directory just made.
		if err := os.Chmod(root, 0o700); err != nil {
			return fmt.Errorf("restrict root %s: %w", root, err)
		}
	}
	return nil
}

// CheckRoot fails unless root already is a snapshotter root (it holds the
// metadata database), naming the path, so that a tool given a mistyped
// root stops before it touches anything.
func CheckRoot(root string) error {
	if _, err := os.Stat(dbPath(root)); err != nil {
		return fmt.Errorf("no overclone root at %s (%w): check --root", root, err)
	}
	return nil
}

// Mode returns the mode the snapshotter serves in.
func (s *Snapshotter) Mode() Mode { return s.mode }

// Abort stops the work that calls share and no caller's cancellation ends
// (flattened layers being built), so that the calls waiting on it return
// with an error: for a daemon that stops without waiting for its calls. A
// build cut off is removed, never named as done. The snapshotter must
// still be closed.
func (s *Snapshotter) Abort() { s.abort() }

// shared returns a context with ctx's values (its logger) that ends when
// the snapshotter is aborted or closed, not when ctx does: for work done
// once on behalf of every caller that waits on it.
func (s *Snapshotter) shared(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(s.life, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// Close aborts shared work, waits for background work and deletions and
// closes the metadata store. It may be called more than once.
func (s *Snapshotter) Close() error {
	s.abort()
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	s.startup.Wait()
	s.background.Wait()
	s.pool.close()
	s.deletions.wait()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.ms.Close()
}

const (
	snapshotsDir = "snapshots"
	linksDir     = "l"
	flatDir      = "flat"
	emptyDir     = "empty" // the lower of a layer being unpacked with no parent
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
