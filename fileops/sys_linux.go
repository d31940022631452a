package fileops

import (
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"
)

// beneath keeps openat2 inside the directory it starts from: no symlink is
// followed (a layer's symlinks are data, not directions) and ".." cannot
// leave the start.
const beneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// openBeneath opens rel ("" for the start itself) below dirfd.
func openBeneath(dirfd int, rel string, flags int, mode uint32) (int, error) {
	if rel == "" {
		rel = "."
	}
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: beneath}
	if flags&(unix.O_CREAT|unix.O_TMPFILE) != 0 {
		how.Mode = uint64(mode)
	}
	for {
		fd, err := unix.Openat2(dirfd, rel, &how)
		// EAGAIN: a concurrent rename anywhere on the system makes
		// RESOLVE_BENEATH refuse rather than risk an escape; retrying is safe.
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		return fd, err
	}
}

// openDir opens a directory by plain path as an O_PATH handle; used only
// for layer roots and host paths the caller named.
func openDir(dir string) (int, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	return fd, nil
}

// procPath names the entry name inside the directory open as dirfd. The
// directory is pinned by the descriptor and name is a single component the
// l* calls do not follow, so xattr calls through it stay beneath the layer.
func procPath(dirfd int, name string) string {
	return "/proc/self/fd/" + strconv.Itoa(dirfd) + "/" + name
}

func fdPath(fd int) string {
	return "/proc/self/fd/" + strconv.Itoa(fd)
}

// notHere reports errors that mean "this layer has nothing at that path".
func notHere(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP)
}

func closeFD(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}

// xattr is one extended attribute, name and value.
type xattr struct {
	name  string
	value []byte
}

// getXattr reads one attribute of the entry at p without following it.
// A missing attribute, or a filesystem without xattrs, is (nil, false).
func getXattr(p, name string) ([]byte, bool, error) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Lgetxattr(p, name, buf)
		switch {
		case err == nil:
			return buf[:n], true, nil
		case errors.Is(err, unix.ENODATA), errors.Is(err, unix.EOPNOTSUPP):
			return nil, false, nil
		case errors.Is(err, unix.ERANGE):
			sz, err := unix.Lgetxattr(p, name, nil)
			if err != nil {
				return nil, false, err
			}
			buf = make([]byte, sz+64)
		default:
			return nil, false, err
		}
	}
}

// listXattrs reads every attribute of the entry at p without following it.
func listXattrs(p string) ([]xattr, error) {
	buf := make([]byte, 1024)
	var n int
	for {
		var err error
		n, err = unix.Llistxattr(p, buf)
		if err == nil {
			break
		}
		if errors.Is(err, unix.EOPNOTSUPP) {
			return nil, nil
		}
		if !errors.Is(err, unix.ERANGE) {
			return nil, fmt.Errorf("list xattrs: %w", err)
		}
		sz, err := unix.Llistxattr(p, nil)
		if err != nil {
			return nil, fmt.Errorf("list xattrs: %w", err)
		}
		buf = make([]byte, sz+256)
	}
	var out []xattr
	for start := 0; start < n; {
		end := start
		for end < n && buf[end] != 0 {
			end++
		}
		name := string(buf[start:end])
		start = end + 1
		if name == "" {
			continue
		}
		v, ok, err := getXattr(p, name)
		if err != nil {
			return nil, fmt.Errorf("get xattr %s: %w", name, err)
		}
		if ok {
			out = append(out, xattr{name, v})
		}
	}
	return out, nil
}
