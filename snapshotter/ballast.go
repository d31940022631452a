package snapshotter

import (
	"errors"
	"fmt"
	"math/bits"
	"strconv"

	"golang.org/x/sys/unix"
)

// The image pool keeps images by size class, a power of two, so that one
// pooled class serves every limit from a quarter of it up to all of it,
// and the first Prepare of a limit never asked for finds an image ready
// (imagepool.go). An image of class C is ext4 made at C bytes; what makes
// it hold a smaller limit L is a ballast: a file at the image's root,
// outside fs/ and work/ (overlay never shows it), fallocated over the
// image's free space by the pool's refill and cut back at take time to
// the C-L bytes the limit does not grant. The ballast's blocks are
// unwritten extents, so they are never written through to the image file:
// the blocks outside the ballast, all the host's disk the image can ever
// hold, are at most L, and the container can write L less the image's own
// metadata. Growing the filesystem instead (EXT4_IOC_RESIZE_FS) needs
// CAP_SYS_RESOURCE, and a fallocate of the free space costs a Prepare
// tens of milliseconds on a big image, where cutting a file back costs
// tens of microseconds.
//
// Usage is the image's statfs less its base less the ballast (its blocks
// and its inode, from one fstatat), so it is right whatever happened to
// the ballast: the base recorded when the image was laid out stays.

// ballastName is the ballast file at an image's root.
const ballastName = "ballast"

// ballastXattr, on the ballast, is its length as the pool left it
// (decimal bytes). A ballast still that long was never cut by a Prepare:
// that cut is carried by the image's journal, which a power cut right
// after the Prepare may lose, and start-up makes it again (recutBallast).
// A Prepare that takes an image whose ballast is right for its limit
// already (cut for it by the refill) cuts nothing, and sets it to
// ballastTaken instead: start-up must not take such a ballast for one the
// pool left, and cut it for a label raised since (Update).
const ballastXattr = "trusted.overclone.ballast"

// ballastTaken is ballastXattr's value on a ballast a Prepare took as the
// pool left it: no length.
const ballastTaken = "-1"

// minClass is the smallest size class: MinMaxSize is the smallest limit.
const minClass = MinMaxSize

// classSpan is how many times a limit a class serving it may be: an ext4
// image's metadata is mostly its inode tables, C/32 at -i 8192, so a
// class four times the limit costs the container an eighth of it at most.
const classSpan = 4

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

// ballastFor is how long the ballast of an image of class c is cut back to
// for a limit of size: whole blocks, so that the blocks outside it, which
// alone can be written, come to at most size bytes.
func ballastFor(c, size int64) int64 {
	const block = 4096 // mkfsExt4's -b
	if size >= c {
		return 0
	}
	return (c - size + block - 1) / block * block
}

// fillBallast fallocates, in a laid-out image of class c mounted at mnt, a
// ballast over the filesystem's free space, less a few blocks for the
// ballast's extent tree, or, if cutFor is set, only as long as a limit of
// cutFor wants it, and syncs it: an image taken from the pool keeps its
// ballast across a power cut, or its limit would grow to its class.
// (Filling all and cutting back would free the blocks in the image's next
// journal commit, and measured, the first change a Prepare then made in a
// 64 GiB image waited 0.6-0.9 ms on it.)
func fillBallast(mnt int, c, cutFor int64) error {
	fd, err := unix.Openat(mnt, ballastName, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create ballast: %w", err)
	}
	defer unix.Close(fd)
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return fmt.Errorf("statfs for the ballast: %w", err)
	}
	// What a file can be given (f_bavail: ext4 keeps some blocks back for
	// itself); an unwritten extent spans at most 32767 blocks and an
	// extent tree block holds 340 of them: the tree and its index fit in
	// the slack with room to spare.
	free := int64(st.Bavail)
	slack := free/32767/340 + 8
	if free <= slack {
		return fmt.Errorf("ballast: %d blocks free, nothing to fill", free)
	}
	size := (free - slack) * st.Bsize
	if cutFor > 0 {
		size = min(size, ballastFor(c, cutFor))
	}
	if size > 0 {
		if err := unix.Fallocate(fd, 0, 0, size); err != nil {
			return fmt.Errorf("fallocate ballast of %d bytes: %w", size, err)
		}
	}
	if err := unix.Fsetxattr(fd, ballastXattr, []byte(strconv.FormatInt(size, 10)), 0); err != nil {
		return fmt.Errorf("set %s: %w", ballastXattr, err)
	}
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("sync ballast: %w", err)
	}
	return nil
}

// trimBallast cuts the ballast of an image of class c mounted at mnt back
// for a limit of size. It fails, leaving the image as it was, when the
// ballast is shorter than the cut (the image would hold more than size).
// A ballast right for size already is marked taken (ballastTaken); an
// image without a ballast (made at its limit) is left alone.
func trimBallast(mnt int, c, size int64) error {
	return cutBallast(mnt, c, size, false)
}

// recutBallast, at start, makes again the cut of a ballast the image's
// journal lost (it is as long as the pool filled it) for a limit of size,
// the snapshot's label. A ballast cut before is left as it is: a label
// changed since (Update) does not change a limit.
func recutBallast(mnt int, c, size int64) error {
	return cutBallast(mnt, c, size, true)
}

func cutBallast(mnt int, c, size int64, onlyUncut bool) error {
	fd, err := unix.Openat(mnt, ballastName, unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open ballast: %w", err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat ballast: %w", err)
	}
	if onlyUncut {
		buf := make([]byte, 32)
		n, err := unix.Fgetxattr(fd, ballastXattr, buf)
		if err != nil {
			return fmt.Errorf("read %s: %w", ballastXattr, err)
		}
		filled, err := strconv.ParseInt(string(buf[:n]), 10, 64)
		if err != nil {
			return fmt.Errorf("bad %s %q: %w", ballastXattr, buf[:n], err)
		}
		if st.Size != filled {
			return nil // cut before
		}
	}
	want := ballastFor(c, size)
	if st.Size < want {
		return fmt.Errorf("ballast of %d bytes cannot hold a %d-byte image to %d bytes (want %d)", st.Size, c, size, want)
	}
	if st.Size == want {
		if !onlyUncut { // taken as the refill cut it
			if err := unix.Fsetxattr(fd, ballastXattr, []byte(ballastTaken), 0); err != nil {
				return fmt.Errorf("set %s: %w", ballastXattr, err)
			}
		}
		return nil
	}
	if err := unix.Ftruncate(fd, want); err != nil {
		return fmt.Errorf("cut ballast back to %d bytes: %w", want, err)
	}
	return nil
}

// ballastUsage is what the ballast of the image whose root is rootfd takes:
// its blocks (with its extent tree) and its inode; zero when it has none.
func ballastUsage(rootfd int) (size, inodes int64, err error) {
	var st unix.Stat_t
	err = unix.Fstatat(rootfd, ballastName, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("stat ballast: %w", err)
	}
	return st.Blocks * 512, 1, nil
}
