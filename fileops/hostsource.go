package fileops

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// hostEntry is one entry of the host tree CopyIn copies from, held open
// with O_PATH from the moment it is first looked at. The host tree may be
// one another container writes (a copy out of one snapshot into another),
// so nothing below the source named on the command line is resolved by
// path: each child is opened beneath its parent's descriptor without
// following links, its stat is the handle's, and its data, entries and
// link text are read through that handle. A directory swapped for a
// symlink while the copy runs is then copied as it was when opened, or as
// the symlink, never followed.
type hostEntry struct {
	dir  int    // the parent directory, open; owned by the parent
	name string // the entry's name in dir
	path string // for messages only
	fd   int    // O_PATH handle on the entry
	st   unix.Stat_t
}

// hostDirOpenedHook, when set by a test, runs once a host directory's
// entries are about to be read through its handle.
var hostDirOpenedHook func(path string)

// openHostSource opens the source CopyIn was given. Its own name is
// resolved as the caller wrote it (links in its parents followed, as cp
// follows them); the last component is not followed, as cp -r copies a
// link as a link.
func openHostSource(hostSrc string) (*hostEntry, error) {
	hostSrc = filepath.Clean(hostSrc)
	parent, name := filepath.Dir(hostSrc), filepath.Base(hostSrc)
	if name == "/" {
		parent, name = "/", "."
	}
	dir, err := unix.Open(parent, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	e, err := openHost(dir, name, hostSrc)
	if err != nil {
		closeFD(dir)
		return nil, err
	}
	return e, nil
}

// close closes the handles of the source openHostSource made.
func (e *hostEntry) close() {
	closeFD(e.fd)
	closeFD(e.dir)
}

func openHost(dir int, name, path string) (*hostEntry, error) {
	fd, err := unix.Openat(dir, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	e := &hostEntry{dir: dir, name: name, path: path, fd: fd}
	if err := unix.Fstat(fd, &e.st); err != nil {
		closeFD(fd)
		return nil, err
	}
	return e, nil
}

func (e *hostEntry) isDir() bool { return e.st.Mode&unix.S_IFMT == unix.S_IFDIR }

// xattrPath names the entry for the l*xattr calls: one component in the
// pinned parent, not followed, as procPath does for layer entries.
func (e *hostEntry) xattrPath() string { return procPath(e.dir, e.name) }

// openData opens a regular file's data for reading through its handle:
// the /proc link of an O_PATH descriptor reopens the inode it holds.
func (e *hostEntry) openData() (int, error) {
	return unix.Open(fdPath(e.fd), unix.O_RDONLY|unix.O_CLOEXEC, 0)
}

// readlink reads a symlink's text through its handle.
func (e *hostEntry) readlink() (string, error) {
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(e.fd, "", buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// eachChild calls fn on each entry of the directory, in name order, each
// opened beneath the directory's handle and closed after fn returns.
func (e *hostEntry) eachChild(fn func(child *hostEntry) error) error {
	dfd, err := unix.Openat(e.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", e.path, err)
	}
	f := os.NewFile(uintptr(dfd), e.path)
	defer f.Close()
	if hostDirOpenedHook != nil {
		hostDirOpenedHook(e.path)
	}
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read %s: %w", e.path, err)
	}
	slices.Sort(names)
	for _, name := range names {
		p := filepath.Join(e.path, name)
		if isStagingName(name) {
			return fmt.Errorf("copy in %s: name reserved for staging: %w", p, ErrInvalidPath)
		}
		child, err := openHost(int(f.Fd()), name, p)
		if err != nil {
			return fmt.Errorf("copy in %s: %w", p, err)
		}
		err = fn(child)
		closeFD(child.fd)
		if err != nil {
			return err
		}
	}
	return nil
}
