package snapshotter

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// LabelMaxSize is containerd 2.4's size limit of an active snapshot, in
// bytes (decimal).
const LabelMaxSize = snapshots.LabelSnapshotMaxSize

// MinMaxSize is the smallest limit honoured: an ext4 image smaller than
// this leaves too little room after its journal and inode tables to be
// what anyone meant, and a value this small is most likely a unit mistake
// (megabytes given as bytes).
const MinMaxSize = 32 << 20

// LimitMechanism says how size limits are enforced on a root, or why
// they cannot be.
type LimitMechanism struct {
	// OK is false when a limit would be refused.
	OK bool `json:"ok"`
	// How names the mechanism ("ext4 image per snapshot") or, when not
	// OK, what is missing.
	How string `json:"how"`
	// Backend is the mechanism chosen: LimitImage or LimitQgroup.
	Backend LimitBackend `json:"backend,omitempty"`
	// Note, if set, says what the operator could change: on a btrfs
	// root without quotas, the command that would enable them.
	Note string `json:"note,omitempty"`
}

// ProbeRootLimits is how size limits are enforced on root with the
// configured backend: a btrfs subvolume with a qgroup limit per limited
// snapshot where root is on btrfs and its filesystem has quotas enabled
// (qgroup.go) and backend is auto, otherwise an image (ProbeLimits).
func ProbeRootLimits(mode Mode, root string, backend LimitBackend) LimitMechanism {
	m, _ := probeRootLimits(mode, root, backend)
	return m
}

func probeRootLimits(mode Mode, root string, backend LimitBackend) (LimitMechanism, *btrfsQuotas) {
	img := ProbeLimits(mode)
	if mode == ModeUserspace || backend == LimitImage {
		return img, nil
	}
	q, why := probeBtrfsQuotas(root)
	if q == nil {
		img.Note = strings.Join(slices.DeleteFunc([]string{why, img.Note}, func(n string) bool { return n == "" }), "; ")
		return img, nil
	}
	return LimitMechanism{OK: true, Backend: LimitQgroup,
		How: fmt.Sprintf("btrfs subvolume per limited snapshot, its qgroup limited (quota mode %s, %s)", q.mode, q.sysfs)}, q
}

// ProbeLimits finds how a root can enforce size limits: a loop-mounted
// ext4 image per limited snapshot needs mkfs.ext4, loop devices and the
// new mount API. Userspace mode cannot use one: there a snapshot is a
// full copy of its parent, and the copy would count against the limit
// (a reflink cannot cross into the image).
func ProbeLimits(mode Mode) LimitMechanism {
	if mode == ModeUserspace {
		return LimitMechanism{How: "userspace mode: a snapshot is a full copy of its parent, which would count against its limit inside an image (use overlay mode for size limits)"}
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return LimitMechanism{How: "mkfs.ext4 not found (install e2fsprogs): " + err.Error()}
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return LimitMechanism{How: "no loop devices (/dev/loop-control): " + err.Error()}
	}
	fd, err := unix.Fsopen("ext4", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return LimitMechanism{How: "cannot mount ext4 through fsopen: " + err.Error()}
	}
	unix.Close(fd)
	m := LimitMechanism{OK: true, Backend: LimitImage, How: "ext4 image per limited snapshot, loop-mounted (" + mkfs + ")"}
	if err := reservesWork(); err != nil {
		m.Note = "no image is kept ready, each limited Prepare formats and mounts its own (5-10x the time of one without a limit): " + err.Error()
	}
	return m
}

// WithLimitBackend chooses how size limits are enforced: LimitAuto (the
// default) or LimitImage.
func WithLimitBackend(b LimitBackend) Opt {
	return func(c *Config) error {
		switch b {
		case "", LimitAuto, LimitImage:
		default:
			return fmt.Errorf("limit_backend %q: want auto or image", b)
		}
		c.LimitBackend = b
		return nil
	}
}

// WithDefaultMaxSize limits every container's active snapshot that does
// not carry the max-size label to size bytes; 0 means no limit.
func WithDefaultMaxSize(size int64) Opt {
	return func(c *Config) error {
		if size != 0 && size < MinMaxSize {
			return fmt.Errorf("default_max_size %d: want 0 (no limit) or at least %d bytes", size, MinMaxSize)
		}
		c.DefaultMaxSize = size
		return nil
	}
}

// limitFor is the size limit of a new snapshot and the options to create
// it with. The label wins; without it, an active snapshot gets the
// default unless it is a layer being unpacked (containerd labels those
// with snapshot.ref): a default meant for containers must not stop an
// image with a big layer from being pulled, nor give every layer an image
// of its own. The default is written into the snapshot's labels, so that
// what the limit is can be read back (Stat, recovery). A label of "0" asks
// for no limit. A limit on a view is accepted and needs nothing: a view
// cannot grow.
func (s *Snapshotter) limitFor(kind snapshots.Kind, info snapshots.Info, opts []snapshots.Opt) (int64, []snapshots.Opt, error) {
	size, labelled, err := parseMaxSize(info.Labels)
	if err != nil {
		return 0, nil, err
	}
	if kind != snapshots.KindActive {
		return 0, opts, nil
	}
	if !labelled && s.defaultMaxSize > 0 && !isExtraction(info) {
		size = s.defaultMaxSize
		opts = append(opts[:len(opts):len(opts)], snapshots.WithLabels(map[string]string{LabelMaxSize: strconv.FormatInt(size, 10)}))
	}
	if size == 0 {
		return 0, opts, nil
	}
	if !s.limits.OK {
		return 0, nil, fmt.Errorf("%s=%d cannot be honoured on this root: %s: %w", LabelMaxSize, size, s.limits.How, errdefs.ErrFailedPrecondition)
	}
	return size, opts, nil
}

// parseMaxSize reads the max-size label: absent, or "0", is no limit.
func parseMaxSize(labels map[string]string) (size int64, labelled bool, err error) {
	v, ok := labels[LabelMaxSize]
	if !ok {
		return 0, false, nil
	}
	size, err = strconv.ParseInt(v, 10, 64)
	if err != nil || size < 0 || (size > 0 && size < MinMaxSize) {
		return 0, true, fmt.Errorf("%s=%q: want a size in bytes, 0 (no limit) or at least %d: %w", LabelMaxSize, v, MinMaxSize, errdefs.ErrInvalidArgument)
	}
	return size, true, nil
}

// limited tells whether an active snapshot with these labels has its
// upper in an image or a limited subvolume.
func limited(info snapshots.Info) bool {
	size, _, err := parseMaxSize(info.Labels)
	return err == nil && size > 0 && info.Kind == snapshots.KindActive
}

// prepareLimitDir makes the temporary directory of a snapshot of this
// kind and limit: on the qgroup path a limited active's is a subvolume,
// limited here.
func (s *Snapshotter) prepareLimitDir(kind snapshots.Kind, limit int64) (string, error) {
	if limit > 0 && s.quotas != nil {
		return s.prepareSubvolume(limit)
	}
	return s.prepareDirectory(kind)
}

// prepareLimit makes the image of a limited snapshot in its temporary
// directory td; nil when there is no limit, or when the limit is td's
// qgroup's (prepareLimitDir set it).
func (s *Snapshotter) prepareLimit(ctx context.Context, td string, size int64) (*loopImage, error) {
	if size == 0 || s.quotas != nil {
		return nil, nil
	}
	if img := s.pool.take(ctx, filepath.Join(td, imageName), size); img != nil {
		return img, nil
	}
	return makeImage(ctx, &s.templates, filepath.Join(td, imageName), size)
}

// detachOrphanImages runs before the orphans are trashed: it unmounts the
// images of directories no metadata names (a crash between Remove's
// transaction and its unmount), since a mount point cannot be renamed into
// the trash. found must be listed before ids were read (see Cleanup).
func (s *Snapshotter) detachOrphanImages(ctx context.Context, ids map[string]string, found rootListing) error {
	for _, name := range found.dirs[snapshotsDir] {
		// A create's new-* is never a mount point: its image is
		// attached only after the rename.
		if _, ok := ids[name]; ok || strings.HasPrefix(name, "new-") {
			continue
		}
		if err := detachImage(ctx, s.snapshotDir(name)); err != nil {
			return err
		}
	}
	return nil
}

// reattachImages, at start, mounts again the images whose snapshot's
// directory is not a mount point (after a reboot): those of limited
// actives, and of snapshots committed from one (containerd replaces the
// labels at Commit, so the image file is what says so). A limited active
// whose image cannot be mounted, or is gone, is unusable, not unlimited.
// An image from the pool gets its reserve back (reattachImage). A limited
// active on the image path tells the pool that limits are in use (its
// covers, imagepool.go). It runs after checkLayers, inside the same write
// transaction, and costs a statx and an lstat per snapshot, and a lookup
// of the labels of each image it mounts.
func (s *Snapshotter) reattachImages(ctx context.Context, ids map[string]string) error {
	s.templates.cleanLeftovers(ctx)
	for id, key := range ids {
		if s.missing.check(id) != nil {
			continue // checkLayers said so
		}
		dir := s.snapshotDir(id)
		if mounted, err := isMountPoint(dir); err != nil || mounted {
			continue
		}
		if _, err := os.Lstat(filepath.Join(dir, imageName)); err != nil {
			continue
		}
		var limit int64
		if _, info, _, err := storage.GetInfo(ctx, key); err == nil && limited(info) {
			limit, _, _ = parseMaxSize(info.Labels)
		}
		if err := reattachImage(ctx, dir, limit); err != nil {
			log.G(ctx).WithError(err).WithField("key", key).WithField("id", id).Error("failed to mount the image of a size-limited snapshot: it is unusable")
			s.missing.add(id, key)
		}
	}
	err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
		if !limited(info) {
			return nil
		}
		if s.quotas == nil {
			s.pool.limitsInUse() // the pool covers limits from the start
		}
		id, _, _, err := storage.GetInfo(ctx, info.Name)
		if err != nil {
			return err
		}
		if s.missing.check(id) != nil {
			return nil
		}
		if isSubvolume(s.snapshotDir(id)) {
			if s.quotas == nil {
				log.G(ctx).WithField("key", info.Name).WithField("id", id).Warn("a size-limited snapshot's subvolume has no qgroup limit any more (quotas disabled on the root's filesystem?): its limit is not enforced")
			}
			return nil
		}
		if mounted, err := isMountPoint(s.snapshotDir(id)); err == nil && !mounted {
			log.G(ctx).WithField("key", info.Name).WithField("id", id).Error("the image of a size-limited snapshot is gone: it is unusable")
			s.missing.add(id, info.Name)
		}
		return nil
	}, "kind==active")
	if errdefs.IsNotFound(err) { // a new root has no snapshots yet
		return nil
	}
	return err
}

// limitedUsage is the Usage of the limited active snapshot id, from its
// filesystem's own accounting: its subvolume's qgroup, or its image's
// statfs. A subvolume whose qgroup is gone (quotas disabled since) is
// walked.
func (s *Snapshotter) limitedUsage(ctx context.Context, id string, info snapshots.Info) (snapshots.Usage, error) {
	dir := s.snapshotDir(id)
	if !isSubvolume(dir) {
		return imageUsage(dir)
	}
	if s.quotas != nil {
		return s.quotas.subvolUsage(ctx, dir)
	}
	return s.usage(ctx, dir, s.upperPath(id), info.Created)
}

// logLimits says at start how size limits will be enforced, or why a
// max-size label will be refused.
func logLimits(ctx context.Context, m LimitMechanism, defaultSize int64) {
	l := log.G(ctx).WithField("default_max_size", defaultSize)
	if m.OK {
		l = l.WithField("how", m.How).WithField("backend", m.Backend)
		if m.Note != "" {
			l = l.WithField("note", m.Note)
		}
		l.Info("size limits (containerd.io/snapshot/max-size) enforced")
		return
	}
	l.WithField("why", m.How).Warn("size limits unavailable: Prepare with containerd.io/snapshot/max-size fails with FailedPrecondition")
}
