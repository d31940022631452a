package fileops

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// srcXattrs reads the attributes a copy carries: all but overlay's own.
func (s *Stack) srcXattrs(p string) ([]xattr, error) {
	xs, err := listXattrs(p)
	if err != nil {
		return nil, err
	}
	out := xs[:0]
	for _, x := range xs {
		if !s.isPrivateXattr(x.name) {
			out = append(out, x)
		}
	}
	return out, nil
}

// applyMeta gives the entry open as fd (an O_PATH handle will do) the
// owner, xattrs and mode of st, in the one order that keeps them all:
// chown clears set-id bits and drops security.capability, so it goes
// first; the capability is written after the data and the owner; the mode
// (with its set-id bits) comes after the xattrs, since a POSIX ACL
// rewrites the group bits. Times are set by setTimes once the entry is in
// place, because creating entries changes them.
//
// Nothing here takes a name: the entry's directory may be one a container
// writes, and a name resolved again after the create may by then be a
// symlink to a host file. /proc/self/fd/N reaches the inode the handle
// holds and never goes on through it, a symlink's included (glibc's
// lchmod relies on the same).
func applyMeta(fd int, st *unix.Stat_t, xs []xattr, lenient bool) error {
	err := unix.Fchownat(fd, "", int(st.Uid), int(st.Gid), unix.AT_EMPTY_PATH)
	// A copy to the host by an unprivileged caller keeps its own owner.
	if err != nil && !(lenient && errors.Is(err, unix.EPERM)) {
		return fmt.Errorf("chown: %w", err)
	}
	for _, x := range xs {
		err := unix.Fsetxattr(fd, x.name, x.value, 0)
		if errors.Is(err, unix.EBADF) {
			err = unix.Setxattr(fdPath(fd), x.name, x.value, 0)
		}
		if err != nil {
			// A host copy may land on a filesystem without that namespace.
			if lenient && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPERM)) {
				continue
			}
			return fmt.Errorf("set xattr %s: %w", x.name, err)
		}
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return nil
	}
	err = unix.Fchmod(fd, st.Mode&0o7777)
	if errors.Is(err, unix.EBADF) {
		err = unix.Fchmodat(unix.AT_FDCWD, fdPath(fd), st.Mode&0o7777, 0)
	}
	if err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	return nil
}

// futimens sets the times of the file open as fd (utimensat with a NULL
// name, which x/sys does not offer: its Futimes goes through /proc). An
// O_PATH handle gets EBADF, and the callers then go through /proc.
func futimens(fd int, ts *[2]unix.Timespec) error {
	_, _, errno := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(ts)), 0, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// setTimes copies atime and mtime to the entry open as fd (any handle,
// O_PATH included, for the reason applyMeta gives); ctime cannot be set.
// A handle open for I/O takes them directly, saving a lookup through /proc
// per file; applyMeta does the same for chmod and xattrs.
func setTimes(fd int, st *unix.Stat_t) error {
	ts := [2]unix.Timespec{st.Atim, st.Mtim}
	err := futimens(fd, &ts)
	if errors.Is(err, unix.EBADF) {
		err = unix.UtimesNanoAt(unix.AT_FDCWD, fdPath(fd), ts[:], 0)
	}
	if err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

func readlinkAt(dirfd int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

var tmpSeq atomic.Uint64

// tmpName is a staging name that no layer content uses (isStagingName
// hides the form in every layer). Callers reserve it through
// newStagingName.
func tmpName() string {
	return stagingPrefix + strconv.Itoa(unix.Getpid()) + "-" + strconv.FormatUint(tmpSeq.Add(1), 10)
}

// makeNode creates a non-regular entry like st at dirfd/name and returns
// it open (see openCreated).
func makeNode(dirfd int, name string, st *unix.Stat_t, linkTarget string) (int, error) {
	var err error
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		err = unix.Mkdirat(dirfd, name, 0o700)
	case unix.S_IFLNK:
		err = unix.Symlinkat(linkTarget, dirfd, name)
	case unix.S_IFIFO, unix.S_IFSOCK, unix.S_IFCHR, unix.S_IFBLK:
		err = unix.Mknodat(dirfd, name, st.Mode&unix.S_IFMT|0o600, int(st.Rdev))
	default:
		return -1, fmt.Errorf("file type %o: %w", st.Mode&unix.S_IFMT, unix.EOPNOTSUPP)
	}
	if err != nil {
		return -1, err
	}
	return openCreated(dirfd, name, st.Mode&unix.S_IFMT)
}

// errSwapped reports an entry that is no longer the one this process made:
// something that can write its directory moved it or put another there.
var errSwapped = errors.New("replaced by another process while being copied")

// openCreated opens the entry this process just made at dirfd/name as an
// O_PATH handle, which every later change goes through. The directory may
// be one a container writes, so the name is looked up once, here, without
// following anything (a symlink put there instead of a directory fails;
// one instead of a link is caught by its owner), and what it finds must be
// of the type made and owned by this process. Whatever the container may
// still swap in under this check is an entry of its own directory, never
// something a link leads to.
func openCreated(dirfd int, name string, typ uint32) (int, error) {
	flags := unix.O_PATH | unix.O_NOFOLLOW
	if typ == unix.S_IFDIR {
		flags |= unix.O_DIRECTORY
	}
	fd, err := openBeneath(dirfd, name, flags, 0)
	if err != nil {
		return -1, fmt.Errorf("open what was created: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		closeFD(fd)
		return -1, err
	}
	if st.Mode&unix.S_IFMT != typ || int(st.Uid) != os.Geteuid() {
		closeFD(fd)
		return -1, fmt.Errorf("%s: %w", name, errSwapped)
	}
	created(dirfd, name)
	return fd, nil
}

// isEntry reports whether dirfd/name is still the inode open as fd.
func isEntry(dirfd int, name string, fd int) bool {
	var a, b unix.Stat_t
	if unix.Fstatat(dirfd, name, &a, unix.AT_SYMLINK_NOFOLLOW) != nil || unix.Fstat(fd, &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// checkEntry fails unless dirfd/name is still the inode open as fd: the
// last check of a copy whose entries a container could have swapped.
func checkEntry(dirfd int, name string, fd int) error {
	if !isEntry(dirfd, name, fd) {
		return fmt.Errorf("%s: %w", name, errSwapped)
	}
	return nil
}

// removeStaged drops a half-built staging entry after a failure, if the
// name still holds the inode open as fd. Without a handle (-1) nothing is
// removed: the name may no longer be this process's, and what a container
// put there is not its to delete (CleanStaging takes a leftover later). A
// directory loses its contents through its own handle, so a directory
// swapped in meanwhile is not emptied.
func removeStaged(dirfd int, name string, fd int) {
	if fd < 0 || !isEntry(dirfd, name, fd) {
		return
	}
	var st unix.Stat_t
	if unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil {
		return
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		_ = unix.Unlinkat(dirfd, name, 0)
		return
	}
	if names, err := readDirNames(fd); err == nil {
		for _, n := range names {
			// os.RemoveAll opens each level O_NOFOLLOW: it stays inside.
			_ = os.RemoveAll(procPath(fd, n))
		}
	}
	_ = unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
}

// readDirNames lists the directory open as fd (an O_PATH handle will do).
func readDirNames(fd int) ([]string, error) {
	rfd, err := unix.Openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(rfd), "dir")
	defer f.Close()
	return f.Readdirnames(-1)
}
