package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// A size-limited active snapshot keeps its upper and work dirs inside a
// filesystem image of its own: ROOT/snapshots/<id>/image, a sparse file of
// the limit's size (or of its size class, held to the limit by its
// reserve: reserve.go), formatted as ext4 and loop-mounted on
// ROOT/snapshots/<id> itself. The mount hides the directory's own (empty) fs and work dirs and
// shows the image's, so every path the rest of the package uses
// (snapshots/<id>/fs, snapshots/<id>/work) is unchanged, and overlay's
// upper and work dir are on one filesystem as it demands. A write past
// the limit is the image filesystem running out of room: ENOSPC, for that
// container only.
//
// The image is made, formatted and mounted before the metadata names the
// snapshot, as a detached mount (fsmount) held by a descriptor: nothing is
// visible in the mount table while the create may still fail, and a daemon
// killed there leaves no mount behind (the kernel dissolves a detached
// mount when its descriptor closes, and the loop device, set to clear
// itself, goes with it). Once the directory is renamed into place the
// mount is moved onto it (move_mount onto a descriptor of the directory).
// Moving is needed because a mount point cannot be renamed (EBUSY).
//
// Remove unmounts after the metadata is gone and before the directory goes
// to the trash (with the image in it). Start-up mounts again the image of
// every limited active whose directory is not a mount point (after a
// reboot) and unmounts the directories no metadata names (a crash between
// Remove's transaction and its unmount), before anything is trashed.

// imageName is the image file inside the snapshot's directory, under the
// mount once it is attached.
const imageName = "image"

// baseXattr, on the image filesystem's root, records what the filesystem
// used before the upper existed ("<bytes> <inodes>"), so that Usage is
// what the snapshot added; it is on the root inode (ext4 keeps it inside
// the inode), read again after a restart.
const baseXattr = "trusted.overclone.base"

// mkfsExt4 formats an image (a template, see template.go) for speed of
// Prepare and room for the container (README "Size limits and Usage"):
//   - lazy_itable_init, lazy_journal_init: mke2fs writes no inode tables
//     or journal, which on a fresh sparse file read as zeros already, and
//     noinit_itable at mount keeps the kernel from zeroing them later;
//   - a 4 MiB journal (the smallest): a container's writable layer keeps
//     the crash safety of a journal without a default journal (32-256 MiB)
//     eating into the limit;
//   - -m 0: no blocks reserved for root, who is who writes in containers;
//   - -b 4096, -i 8192: small images would otherwise get 1 KiB blocks, and
//     one inode per 8 KiB lets 100k small files fit a 1 GiB limit;
//   - ^resize_inode: images are never grown online; nodiscard: nothing to
//     discard in a new sparse file.
var mkfsExt4 = []string{"-q", "-F", "-b", "4096", "-i", "8192", "-m", "0", "-J", "size=4",
	"-O", "^resize_inode", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"}

// loopImage is a formatted image mounted detached, between Prepare's
// formatting and the move onto the snapshot's directory.
type loopImage struct {
	mnt int // the detached mount, from fsmount
}

// makeImage creates the image file path of size bytes, formats it (from
// a template) and mounts it detached, with work/ and fs/ inside and the
// base usage recorded (the template holds them already).
func makeImage(ctx context.Context, templates *imageTemplates, path string, size int64) (_ *loopImage, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create image %s: %w", path, err)
	}
	f.Close()
	laidOut, err := templates.format(ctx, path, size)
	if err != nil {
		return nil, err
	}
	mnt, err := mountImage(path)
	if err != nil {
		return nil, err
	}
	img := &loopImage{mnt: mnt}
	defer func() {
		if err != nil {
			img.close()
		}
	}()
	if !laidOut {
		if err := layOut(mnt); err != nil {
			return nil, fmt.Errorf("image %s: %w", path, err)
		}
	}
	return img, nil
}

// layOut makes, in a freshly formatted image mounted at mnt, the dirs a
// limited snapshot needs and records its base. work first, with the
// work/work overlay makes at its first mount, and the base taken before
// fs exists: the upper's own directory is part of what a walk of the
// upper counts, overlay's scratch is not.
func layOut(mnt int) error {
	if err := unix.Mkdirat(mnt, "work", 0o711); err != nil {
		return fmt.Errorf("create work dir: %w", err)
	}
	if err := unix.Mkdirat(mnt, "work/work", 0); err != nil {
		return fmt.Errorf("create work dir: %w", err)
	}
	if err := recordBase(mnt); err != nil {
		return err
	}
	if err := unix.Mkdirat(mnt, "fs", 0o755); err != nil {
		return fmt.Errorf("create fs dir: %w", err)
	}
	return nil
}

// mountImage attaches path to a new loop device and mounts it detached,
// returning the mount's descriptor. The loop device clears itself when
// the last user lets go of it: the mount's unmount, or this process's
// end if it dies before mounting.
func mountImage(path string) (int, error) {
	// Direct I/O: the image's pages are cached once, by the image's
	// filesystem, not again as the backing file's (measured: mounting
	// is no slower for it).
	loop, err := mount.SetupLoop(path, mount.LoopParams{Autoclear: true, Direct: true})
	if err != nil {
		return -1, fmt.Errorf("attach %s to a loop device: %w", path, err)
	}
	defer loop.Close() // the mount holds the device from here on
	return mountLoop(loop, path)
}

// mountLoop mounts the ext4 on the loop device loop (bound to path)
// detached.
func mountLoop(loop *os.File, path string) (int, error) {
	fsfd, err := unix.Fsopen("ext4", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("fsopen ext4 for %s: %w", path, err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigSetString(fsfd, "source", loop.Name()); err != nil {
		return -1, fmt.Errorf("mount %s from %s: source: %w", path, loop.Name(), err)
	}
	if err := unix.FsconfigSetFlag(fsfd, "noinit_itable"); err != nil {
		return -1, fmt.Errorf("mount %s: noinit_itable: %w", path, err)
	}
	// What the container frees goes back to the host: after each
	// journal commit ext4 discards the blocks freed (from a workqueue),
	// and the loop device punches them out of the image file. Without it
	// the file would keep every block ever written, up to its size class
	// (reserve.go).
	if err := unix.FsconfigSetFlag(fsfd, "discard"); err != nil {
		return -1, fmt.Errorf("mount %s: discard: %w", path, err)
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return -1, fmt.Errorf("mount %s from %s: %w", path, loop.Name(), err)
	}
	mnt, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("fsmount %s: %w", path, err)
	}
	return mnt, nil
}

// recordBase stores what the image's filesystem uses now on its root.
// The value is written twice at the same length, and the base read in
// between, so that whatever room the attribute itself takes is in the base;
// so is the limit's record (reserve.go), written first as zeros.
func recordBase(mnt int) error {
	rootfd, err := unix.Openat(mnt, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open root: %w", err)
	}
	defer unix.Close(rootfd)
	if err := unix.Fsetxattr(rootfd, limitXattr, []byte(formatLimit(0)), 0); err != nil {
		return fmt.Errorf("set %s: %w", limitXattr, err)
	}
	if err := unix.Fsetxattr(rootfd, baseXattr, []byte(formatBase(snapshots.Usage{})), 0); err != nil {
		return fmt.Errorf("set %s: %w", baseXattr, err)
	}
	used, err := fsUsed(rootfd)
	if err != nil {
		return err
	}
	if err := unix.Fsetxattr(rootfd, baseXattr, []byte(formatBase(used)), 0); err != nil {
		return fmt.Errorf("set %s: %w", baseXattr, err)
	}
	return nil
}

func formatBase(u snapshots.Usage) string {
	return fmt.Sprintf("%020d %020d", u.Size, u.Inodes)
}

// fsUsed is what the filesystem of fd uses, by its own accounting.
func fsUsed(fd int) (snapshots.Usage, error) {
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return snapshots.Usage{}, fmt.Errorf("statfs: %w", err)
	}
	return snapshots.Usage{
		Size:   int64(st.Blocks-st.Bfree) * st.Bsize,
		Inodes: int64(st.Files - st.Ffree),
	}, nil
}

// attach copies the owner and times of dir/fs (the parent layer's owner,
// as Prepare set it, and the time Prepare made it) onto the image's fs
// dir, which the template made earlier, and moves the mount onto dir.
func (img *loopImage) attach(dir string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(unix.AT_FDCWD, filepath.Join(dir, "fs"), &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("stat %s/fs: %w", dir, err)
	}
	if err := unix.Fchownat(img.mnt, "fs", int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("chown fs dir in the image of %s: %w", dir, err)
	}
	times := []unix.Timespec{st.Atim, st.Mtim}
	if err := unix.UtimesNanoAt(img.mnt, "fs", times, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times of fs dir in the image of %s: %w", dir, err)
	}
	return moveOnto(img.mnt, dir)
}

// moveOnto attaches the detached mount mnt on dir, named by a descriptor
// opened without following a symlink.
func moveOnto(mnt int, dir string) error {
	dfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s to mount its image: %w", dir, err)
	}
	defer unix.Close(dfd)
	if err := unix.MoveMount(mnt, "", dfd, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("mount image on %s: %w", dir, err)
	}
	return nil
}

// close lets go of the detached mount: if it was never attached, the
// kernel unmounts it and clears its loop device.
func (img *loopImage) close() {
	if img != nil && img.mnt >= 0 {
		unix.Close(img.mnt)
		img.mnt = -1
	}
}

// isMountPoint tells whether dir is the root of a mount (an attached image).
func isMountPoint(dir string) (bool, error) {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, dir, unix.AT_SYMLINK_NOFOLLOW|unix.AT_STATX_DONT_SYNC, 0, &stx); err != nil {
		return false, err
	}
	return stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, nil
}

// detachImage unmounts the image mounted on dir, if one is. A container
// still running on the snapshot keeps the filesystem (overlay holds its
// upper's mount of its own), so a busy mount is detached lazily: the
// kernel lets go of it and of its loop device when the last user does.
func detachImage(ctx context.Context, dir string) error {
	mounted, err := isMountPoint(dir)
	if err != nil || !mounted {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	err = unix.Unmount(dir, unix.UMOUNT_NOFOLLOW)
	if errors.Is(err, unix.EBUSY) {
		log.G(ctx).WithField("path", dir).Warn("snapshot image still in use: detached, freed when its last user unmounts")
		err = unix.Unmount(dir, unix.UMOUNT_NOFOLLOW|unix.MNT_DETACH)
	}
	if err != nil {
		return fmt.Errorf("unmount image of %s: %w", dir, err)
	}
	return nil
}

// reattachImage mounts again the image of a limited snapshot whose
// directory is not a mount point (the node rebooted, or the mount was
// taken away by hand). The image keeps its files and its base; an image
// of a size class gets its reserve back (restoreLimit), from the limit
// recorded on it or else from limit, the snapshot's label (0: a committed
// layer, which does not grow).
func reattachImage(ctx context.Context, dir string, limit int64) error {
	mounted, err := isMountPoint(dir)
	if err != nil {
		return fmt.Errorf("check mount of %s: %w", dir, err)
	}
	if mounted {
		return nil
	}
	path := filepath.Join(dir, imageName)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fmt.Errorf("the size limit's image is gone: %w", err)
	}
	mnt, err := remountImage(ctx, path)
	if err != nil {
		return err
	}
	defer unix.Close(mnt)
	if err := restoreLimit(mnt, st.Size, limit); err != nil {
		return fmt.Errorf("image %s: %w", path, err)
	}
	return moveOnto(mnt, dir)
}

// imageUsage is what a limited snapshot's upper takes, from its
// filesystem's own counters: two syscalls, whatever the upper holds.
func imageUsage(dir string) (snapshots.Usage, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", dir, err)
	}
	defer unix.Close(fd)
	buf := make([]byte, 64)
	n, err := unix.Fgetxattr(fd, baseXattr, buf)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: read %s (is its image mounted?): %w", dir, baseXattr, err)
	}
	base, err := parseBase(string(buf[:n]))
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", dir, err)
	}
	used, err := fsUsed(fd)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", dir, err)
	}
	// An image held to its limit by a ballast (reserve.go) keeps it.
	bSize, bInodes, err := legacyBallast(fd)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", dir, err)
	}
	return snapshots.Usage{Size: max(used.Size-base.Size-bSize, 0), Inodes: max(used.Inodes-base.Inodes-bInodes, 0)}, nil
}

func parseBase(s string) (snapshots.Usage, error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return snapshots.Usage{}, fmt.Errorf("bad %s %q", baseXattr, s)
	}
	size, err1 := strconv.ParseInt(f[0], 10, 64)
	inodes, err2 := strconv.ParseInt(f[1], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return snapshots.Usage{}, fmt.Errorf("bad %s %q: %w", baseXattr, s, err)
	}
	return snapshots.Usage{Size: size, Inodes: inodes}, nil
}
