package snapshotter

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The image pool keeps images by size class, a power of two, so that one
// pooled class serves every limit from a quarter of it up to all of it,
// and the first Prepare of a limit never asked for finds an image ready
// (imagepool.go). An image of class C is ext4 made at C bytes; what holds
// it to a smaller limit L is its reserve. ext4 keeps a number of clusters
// back from every allocation but the few its own metadata must make on a
// full filesystem (s_resv_clusters: 2 % of the filesystem, at most 16
// MiB, by default), whatever the writer's capabilities: unlike the blocks
// reserved for root (mke2fs -m), a container's root cannot use them, nor
// can CAP_SYS_RESOURCE. Root sets the number at run time in
// /sys/fs/ext4/<device>/reserved_clusters. A pooled image's reserve is
// the default plus the C-L bytes the limit does not grant, so that what
// ext4 can ever allocate, files and metadata, comes to at most L: the
// image file never holds more of the host's disk, and the container can
// write L less the image's metadata and the default reserve, as in an
// image made at L. Setting it is one write to sysfs, a few microseconds
// whatever C-L. (The pool first held images to their limits with a
// ballast, a file fallocated over the free space and cut back by the
// Prepare: the cut cost 0.022 ms per GiB it freed, 2 ms for a 128 GiB
// class, and the fallocate tens of milliseconds of every refill. Growing
// the filesystem instead, EXT4_IOC_RESIZE_FS, needs CAP_SYS_RESOURCE.)
//
// The reserve is the mounted filesystem's, in memory: it lasts as long as
// the filesystem is mounted (across a daemon's restart or crash, and in
// any mount namespace holding a copy), and the next mount starts from the
// default. So the limit an image was given at its Prepare is recorded on
// its root (limitXattr), and start-up sets the reserve again from it when
// it mounts the image after a reboot (reattachImage). The record rides on
// the image's journal, not synced by the Prepare; a reboot that lost it
// (a power cut within seconds of the Prepare) falls back on the
// snapshot's label, which only an Update in those seconds can have
// changed.
//
// Usage is the image's statfs less its base: a reserve takes no blocks.

// limitXattr, on a pooled image's root, is the limit its Prepare gave it
// (decimal bytes, 20 digits); layOut writes it as zeros, "none", before
// the base is taken, so that its room is in the base.
const limitXattr = "trusted.overclone.limit"

// minClass is the smallest size class: MinMaxSize is the smallest limit.
const minClass = MinMaxSize

// classSpan is how many times a limit a class serving it may be: an ext4
// image's metadata is mostly its inode tables, C/32 at -i 8192, so a
// class four times the limit costs the container an eighth of it at most.
const classSpan = 4

// reserveBlock is the images' block and cluster size (mkfsExt4's -b).
const reserveBlock = 4096

// sizeClass is the class of a limit: the smallest power of two at least
// size (and at least minClass).
func sizeClass(size int64) int64 {
	if size <= minClass {
		return minClass
	}
	return 1 << bits.Len64(uint64(size-1))
}

// serves tells whether an image of class c can hold the limit size.
func serves(c, size int64) bool {
	return size <= c && c <= classSpan*size
}

// reserveFor is the reserve, in clusters, that holds an image of class c
// to a limit of size: ext4's default for the image (as ext4 computes it at
// mount: a fiftieth of the clusters, at most 4096) and the clusters past
// size, rounded up.
func reserveFor(c, size int64) int64 {
	clusters := c / reserveBlock
	extra := int64(0)
	if size < c {
		extra = (c - size + reserveBlock - 1) / reserveBlock
	}
	return min(clusters/50, 4096) + extra
}

// setLimit holds the image of class c mounted at mnt to a limit of size:
// its reserve, and, when record is set (a Prepare taking the image), the
// limit recorded on its root for a reboot to find.
func setLimit(mnt int, c, size int64, record bool) error {
	if record {
		if err := setRecord(mnt, size); err != nil {
			return err
		}
	}
	attr, err := reserveAttr(mnt)
	if err != nil {
		return err
	}
	fd, err := unix.Open(attr, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("hold an image to its limit: %w", err)
	}
	defer unix.Close(fd)
	if _, err := unix.Write(fd, []byte(strconv.FormatInt(reserveFor(c, size), 10))); err != nil {
		return fmt.Errorf("hold an image of %d bytes to %d: write %s: %w", c, size, attr, err)
	}
	return nil
}

// primeLimit makes, in a pooled image mounted at mnt, the first changes and
// lookups a filesystem just mounted pays for, so that its take does not
// (each reads a block through the loop device, direct I/O): it writes
// the zero record again, which reads the root's attribute block through
// the loop device and starts the journal's first transaction, and reads
// the reserve's sysfs file. Measured, the take's record and reserve cost
// 0.13-0.33 ms in an image no write had touched since its mount, and
// 12-17 µs after. (Syncing the image here as well made every take after
// it 2-8 ms slower: measured, and not kept.)
func primeLimit(mnt int) error {
	if err := setRecord(mnt, 0); err != nil {
		return err
	}
	if _, err := reserveOf(mnt); err != nil {
		return err
	}
	// And looks fs up, which reads the root's directory block: the
	// take's chown of fs paid 0.17-0.2 ms for it, 1.4 µs after.
	var st unix.Stat_t
	if err := unix.Fstatat(mnt, "fs", &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("stat fs dir: %w", err)
	}
	return nil
}

// reservesWork tells whether images can be held to their limits by their
// reserves: /sys/fs/ext4 is there and writable (sysfs mounted read-write,
// as in a privileged pod).
func reservesWork() error {
	if err := unix.Access("/sys/fs/ext4", unix.W_OK); err != nil {
		return fmt.Errorf("cannot set ext4 reserves in /sys/fs/ext4: %w", err)
	}
	return nil
}

// setRecord records size as the limit of the image mounted at mnt.
func setRecord(mnt int, size int64) error {
	rootfd, err := unix.Openat(mnt, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open image root: %w", err)
	}
	defer unix.Close(rootfd)
	if err := unix.Fsetxattr(rootfd, limitXattr, []byte(formatLimit(size)), unix.XATTR_REPLACE); err != nil {
		return fmt.Errorf("set %s: %w", limitXattr, err)
	}
	return nil
}

// reserveAttr is the sysfs file of the reserve of the ext4 mounted at mnt,
// named by the device the filesystem is on (a loop device's name).
func reserveAttr(mnt int) (string, error) {
	var st unix.Stat_t
	if err := unix.Fstat(mnt, &st); err != nil {
		return "", fmt.Errorf("stat image root: %w", err)
	}
	link := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev))
	dev, err := os.Readlink(link)
	if err != nil {
		return "", fmt.Errorf("the image's device: %w", err)
	}
	return filepath.Join("/sys/fs/ext4", filepath.Base(dev), "reserved_clusters"), nil
}

// reserveOf is the reserve, in clusters, of the ext4 mounted at mnt.
func reserveOf(mnt int) (int64, error) {
	attr, err := reserveAttr(mnt)
	if err != nil {
		return 0, err
	}
	b, err := os.ReadFile(attr)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

func formatLimit(size int64) string {
	return fmt.Sprintf("%020d", size)
}

// recordedLimit is the limit recorded on the root of the image mounted at
// mnt, 0 when none is (an image made at its limit, or a record a power
// cut lost).
func recordedLimit(mnt int) (int64, error) {
	rootfd, err := unix.Openat(mnt, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open image root: %w", err)
	}
	defer unix.Close(rootfd)
	buf := make([]byte, 32)
	n, err := unix.Fgetxattr(rootfd, limitXattr, buf)
	if errors.Is(err, unix.ENODATA) {
		return 0, nil // laid out before limits were recorded
	}
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", limitXattr, err)
	}
	size, err := strconv.ParseInt(string(buf[:n]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("bad %s %q: %w", limitXattr, buf[:n], err)
	}
	return size, nil
}

// restoreLimit, at start, holds an image of class c just mounted again
// (its reserve is the default) to its limit: the one recorded, or if
// none is, label, the snapshot's (0: none, a committed layer).
func restoreLimit(mnt int, c, label int64) error {
	if b, _, err := legacyBallast(mnt); err != nil || b > 0 {
		return err // held by its ballast
	}
	size, err := recordedLimit(mnt)
	if err != nil {
		return err
	}
	if size == 0 {
		size = label
	}
	if size == 0 || size >= c {
		return nil // made at its limit
	}
	return setLimit(mnt, c, size, false)
}

// legacyBallast is what a ballast file at the root of an image (rootfd)
// takes, the way images were held to their limits before reserves: its
// blocks and its inode; zero when it has none. An image made then keeps
// its ballast, and its Usage leaves it out.
func legacyBallast(rootfd int) (size, inodes int64, err error) {
	var st unix.Stat_t
	err = unix.Fstatat(rootfd, "ballast", &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("stat ballast: %w", err)
	}
	return st.Blocks * 512, 1, nil
}
