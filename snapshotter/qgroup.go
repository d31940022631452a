package snapshotter

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"golang.org/x/sys/unix"
)

// On a root on btrfs whose filesystem has quotas enabled, a size-limited
// active snapshot's directory, ROOT/snapshots/<id>, is a btrfs subvolume
// of its own, made with fs and work inside it (overlay needs them on one
// subvolume: a rename between subvolumes is EXDEV) and its qgroup limited
// to the label's bytes (max referenced). A write past the limit fails with
// EDQUOT, for that container only; nothing is mounted, so nothing has to
// be found again after a restart or a reboot.
//
// The daemon never enables quotas itself: qgroups are a filesystem-wide
// choice whose accounting every write on that filesystem pays for. It uses
// them where the operator enabled them (`btrfs quota enable ROOT`, or
// `btrfs quota enable --simple ROOT`, simple quotas, btrfs-progs 6.7+ and
// kernel 6.7+); otherwise a btrfs root keeps the image path (loopimage.go),
// and the start-up log names the command.
//
// Usage: bytes from the qgroup's counters in sysfs (referenced, plus the
// data reserved for writes not yet committed), inodes from a search of the
// subvolume's tree (btrfsCountInodes), kept and redone in the background
// (qgroup_inodes.go): no walk of the upper.
//
// Remove: the directory goes to the trash like any other and is destroyed
// there (removeTree): one ioctl, whatever the subvolume holds; the kernel's
// cleaner frees its tree in the background and, when the subvolume is
// gone, deletes its qgroup (measured on 6.18: `btrfs qgroup show` lists no
// stale 0/<id> once `btrfs subvolume sync` returns; older kernels let the
// daemon delete it at once, see destroySubvolume). A crash before the
// rename into place leaves a new-* subvolume, trashed at the next start.

// LimitBackend chooses how size limits are enforced.
type LimitBackend string

const (
	// LimitAuto: a btrfs subvolume with a qgroup limit where the root
	// is on btrfs with quotas enabled, otherwise an image.
	LimitAuto LimitBackend = "auto"
	// LimitImage: always an ext4 image per limited snapshot.
	LimitImage LimitBackend = "image"
	// LimitQgroup is what auto resolves to on a btrfs root with quotas.
	LimitQgroup LimitBackend = "btrfs-qgroup"
)

// subvolBase is what a limited snapshot's subvolume holds before the
// container writes: its root, work and work/work (made at Prepare, as
// overlay would at its first mount). Usage does not count them, as a walk
// of the upper does not.
const subvolBaseInodes = 3

// btrfsQuotas is what the probe found of a btrfs root's quotas, and the
// inode counts of limited snapshots (qgroup_inodes.go).
type btrfsQuotas struct {
	sysfs    string // /sys/fs/btrfs/<fsid>
	mode     string // "qgroup" or "squota"
	nodesize int64

	counts inodeCounts
}

// probeBtrfsQuotas finds whether root is on btrfs and, if it is, whether
// quotas are enabled there. It returns a nil *btrfsQuotas and, on btrfs,
// why not: what the operator could do.
func probeBtrfsQuotas(root string) (*btrfsQuotas, string) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Sprintf("open %s: %v", root, err)
	}
	defer unix.Close(fd)
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return nil, fmt.Sprintf("statfs %s: %v", root, err)
	}
	if st.Type != unix.BTRFS_SUPER_MAGIC {
		return nil, ""
	}
	fsid, err := btrfsFsID(fd)
	if err != nil {
		return nil, fmt.Sprintf("btrfs fs info of %s: %v", root, err)
	}
	q := &btrfsQuotas{sysfs: filepath.Join("/sys/fs/btrfs", fsid)}
	// Every mounted btrfs has its directory in sysfs; its qgroups
	// directory is there only while quotas are enabled. Without the
	// first (a container that has no sysfs of the host's at /sys), the
	// daemon cannot tell whether quotas are on, and enabling them would
	// change nothing: say what it lacks.
	if _, err := os.Stat(q.sysfs); err != nil {
		return nil, fmt.Sprintf("cannot tell whether the btrfs filesystem of %s has quotas enabled: %v (is the host's sysfs mounted at /sys? a container needs it, as a privileged one gets it)", root, err)
	}
	enabled, err := os.ReadFile(filepath.Join(q.sysfs, "qgroups", "enabled"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Sprintf("cannot tell whether the btrfs filesystem of %s has quotas enabled: %v", root, err)
	}
	if err != nil || strings.TrimSpace(string(enabled)) != "1" {
		return nil, fmt.Sprintf("quotas are not enabled on the btrfs filesystem of %s (`btrfs quota enable %s`, or `btrfs quota enable --simple %s` with btrfs-progs 6.7+, would enable them; it costs every write on that filesystem some accounting)", root, root, root)
	}
	q.mode = "qgroup"
	if m, err := os.ReadFile(filepath.Join(q.sysfs, "qgroups", "mode")); err == nil {
		q.mode = strings.TrimSpace(string(m))
	}
	ns, err := readSysfsInt(filepath.Join(q.sysfs, "nodesize"))
	if err != nil {
		return nil, err.Error()
	}
	q.nodesize = ns
	return q, ""
}

func readSysfsInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return n, nil
}

// prepareSubvolume makes snapshots/new-XXXX as a btrfs subvolume whose
// qgroup is limited to size bytes, with fs and work (and work/work) inside
// it, all through descriptors.
func (s *Snapshotter) prepareSubvolume(size int64) (_ string, err error) {
	parent := filepath.Join(s.root, snapshotsDir)
	dirfd, err := unix.Open(parent, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open %s: %w", parent, err)
	}
	defer unix.Close(dirfd)
	var name string
	for range 100 {
		var b [8]byte
		rand.Read(b[:])
		name = "new-" + hex.EncodeToString(b[:])
		err = btrfsSubvolCreate(dirfd, name)
		if !errors.Is(err, unix.EEXIST) {
			break
		}
	}
	if err != nil {
		return "", fmt.Errorf("create btrfs subvolume in %s: %w", parent, err)
	}
	td := filepath.Join(parent, name)
	defer func() {
		if err != nil {
			btrfsSubvolDestroy(dirfd, name)
		}
	}()
	fd, err := openSubvolume(dirfd, name)
	if err != nil {
		return "", fmt.Errorf("open new subvolume %s: %w", td, err)
	}
	defer unix.Close(fd)
	if err := btrfsLimitReferenced(fd, uint64(size)); err != nil {
		return "", fmt.Errorf("set the qgroup limit of %s to %d bytes: %w", td, size, err)
	}
	// 0700, as every other snapshot directory (MkdirTemp): a new
	// subvolume's root is 0755.
	if err := unix.Fchmod(fd, 0o700); err != nil {
		return "", fmt.Errorf("chmod %s: %w", td, err)
	}
	for _, d := range []struct {
		name string
		mode uint32
	}{{"fs", 0o755}, {"work", 0o711}, {"work/work", 0}} {
		if err := unix.Mkdirat(fd, d.name, d.mode); err != nil {
			return "", fmt.Errorf("create %s/%s: %w", td, d.name, err)
		}
	}
	return td, nil
}

// openSubvolume opens name in dirfd, without following a symlink, and
// checks that it is a subvolume's root.
func openSubvolume(dirfd int, name string) (int, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if st.Ino != btrfsFirstFreeObjectID {
		unix.Close(fd)
		return -1, fmt.Errorf("not a btrfs subvolume (inode %d)", st.Ino)
	}
	return fd, nil
}

// isSubvolume tells whether dir is the root of a btrfs subvolume: a
// limited snapshot made on the qgroup path (or recreated on it).
func isSubvolume(dir string) bool {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil || st.Ino != btrfsFirstFreeObjectID || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return false
	}
	var sfs unix.Statfs_t
	return unix.Statfs(dir, &sfs) == nil && sfs.Type == unix.BTRFS_SUPER_MAGIC
}

// subvolUsage is what a limited snapshot's upper takes: its qgroup's
// referenced bytes, plus the data reserved for writes the next
// transaction commit will account (so that a write shows at once; what a
// deletion frees shows at that commit, within the filesystem's commit
// interval, 30 s by default), less the subvolume's first tree block; and
// its inodes counted in its tree, less the three the upper does not hold.
func (q *btrfsQuotas) subvolUsage(ctx context.Context, dir string) (snapshots.Usage, error) {
	dirfd, err := unix.Open(filepath.Dir(dir), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", dir, err)
	}
	defer unix.Close(dirfd)
	fd, err := openSubvolume(dirfd, filepath.Base(dir))
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", dir, err)
	}
	defer unix.Close(fd)
	id, err := btrfsSubvolID(fd)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: subvolume id: %w", dir, err)
	}
	qg := filepath.Join(q.sysfs, "qgroups", "0_"+strconv.FormatUint(id, 10))
	rfer, err := readSysfsInt(filepath.Join(qg, "referenced"))
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: qgroup (are quotas still enabled?): %w", dir, err)
	}
	rsv, err := readSysfsInt(filepath.Join(qg, "rsv_data"))
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: qgroup: %w", dir, err)
	}
	inodes, err := q.counts.inodes(ctx, dir, fd, id)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: count inodes: %w", dir, err)
	}
	return snapshots.Usage{
		Size:   max(rfer+rsv-q.nodesize, 0),
		Inodes: max(inodes-subvolBaseInodes, 0),
	}, nil
}

// removeTree deletes path, a directory in the trash: a subvolume by one
// destroy, anything else (or a subvolume the destroy refused) by
// RemoveAll, which can remove an emptied subvolume too.
func removeTree(path string) error {
	if isSubvolume(path) && destroySubvolume(path) == nil {
		return nil
	}
	return os.RemoveAll(path)
}

// destroySubvolume destroys the subvolume path and asks for its qgroup to
// go too. A recent kernel refuses that while the cleaner has not yet
// freed the subvolume (EBUSY, measured on 6.18, with qgroups and simple
// quotas) and deletes the qgroup itself once it has; an older one, which
// would leave it stale for good, deletes it here. A root without quotas
// says ENOTCONN. Either way the error changes nothing.
func destroySubvolume(path string) error {
	dirfd, err := unix.Open(filepath.Dir(path), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(dirfd)
	fd, err := openSubvolume(dirfd, filepath.Base(path))
	if err != nil {
		return err
	}
	id, err := btrfsSubvolID(fd)
	unix.Close(fd)
	if err != nil {
		return err
	}
	if err := btrfsSubvolDestroy(dirfd, filepath.Base(path)); err != nil {
		return err
	}
	_ = btrfsQgroupDelete(dirfd, id)
	return nil
}
