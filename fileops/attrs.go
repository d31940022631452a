package fileops

import (
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// target is where attributes go: an open descriptor (a file not yet
// linked in) or a name inside an open directory.
type target struct {
	fd    int
	dirfd int
	name  string
}

func fdTarget(fd int) target                   { return target{fd: fd, dirfd: -1} }
func nameTarget(dirfd int, name string) target { return target{fd: -1, dirfd: dirfd, name: name} }

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

// applyMeta gives t the owner, xattrs and mode of st, in the one order
// that keeps them all: chown clears set-id bits and drops
// security.capability, so it goes first; the capability is written after
// the data and the owner; the mode (with its set-id bits) comes after the
// xattrs, since a POSIX ACL rewrites the group bits. Times are set by
// setTimes once the entry is in place, because creating entries changes
// them.
func applyMeta(t target, st *unix.Stat_t, xs []xattr, lenient bool) error {
	isLink := st.Mode&unix.S_IFMT == unix.S_IFLNK
	var err error
	if t.fd >= 0 {
		err = unix.Fchown(t.fd, int(st.Uid), int(st.Gid))
	} else {
		err = unix.Fchownat(t.dirfd, t.name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW)
	}
	// A copy to the host by an unprivileged caller keeps its own owner.
	if err != nil && !(lenient && errors.Is(err, unix.EPERM)) {
		return fmt.Errorf("chown: %w", err)
	}
	for _, x := range xs {
		if t.fd >= 0 {
			err = unix.Fsetxattr(t.fd, x.name, x.value, 0)
		} else {
			err = unix.Lsetxattr(procPath(t.dirfd, t.name), x.name, x.value, 0)
		}
		if err != nil {
			// A host copy may land on a filesystem without that namespace.
			if lenient && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPERM)) {
				continue
			}
			return fmt.Errorf("set xattr %s: %w", x.name, err)
		}
	}
	if isLink {
		return nil
	}
	if t.fd >= 0 {
		err = unix.Fchmod(t.fd, st.Mode&0o7777)
	} else {
		err = unix.Fchmodat(t.dirfd, t.name, st.Mode&0o7777, 0)
	}
	if err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	return nil
}

// setTimes copies atime and mtime; ctime cannot be set.
func setTimes(dirfd int, name string, st *unix.Stat_t) error {
	ts := []unix.Timespec{st.Atim, st.Mtim}
	if err := unix.UtimesNanoAt(dirfd, name, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// setDirTimes sets the times of the directory open as an O_PATH handle.
func setDirTimes(dirfd int, st *unix.Stat_t) error {
	ts := []unix.Timespec{st.Atim, st.Mtim}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, fdPath(dirfd), ts, 0); err != nil {
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

// makeNode creates a non-regular entry like st at dirfd/name.
func makeNode(dirfd int, name string, st *unix.Stat_t, linkTarget string) error {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return unix.Mkdirat(dirfd, name, 0o700)
	case unix.S_IFLNK:
		return unix.Symlinkat(linkTarget, dirfd, name)
	case unix.S_IFIFO, unix.S_IFSOCK, unix.S_IFCHR, unix.S_IFBLK:
		return unix.Mknodat(dirfd, name, st.Mode&unix.S_IFMT|0o600, int(st.Rdev))
	}
	return fmt.Errorf("file type %o: %w", st.Mode&unix.S_IFMT, unix.EOPNOTSUPP)
}

// removeStaged drops a half-built staging entry after a failure.
func removeStaged(dirfd int, name string, dir bool) {
	flags := 0
	if dir {
		flags = unix.AT_REMOVEDIR
	}
	_ = unix.Unlinkat(dirfd, name, flags)
}
