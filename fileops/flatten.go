package fileops

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// FlattenStats counts what a Flatten or CopyOut wrote.
type FlattenStats struct {
	Dirs, Files, Symlinks, Specials, HardLinks int
	Bytes                                      int64 // file data written or shared
	Reflinked                                  int64 // of Bytes, shared by reflink
}

// maxLinkFDs caps the descriptors kept open to re-link hard links; past
// it, further links are written as copies rather than failing with EMFILE.
const maxLinkFDs = 4096

// linker re-creates hard links: the first copy of an inode is kept open
// (O_PATH) and later names are linked to it with AT_EMPTY_PATH.
type linker struct {
	fds map[inodeKey]int
}

func newLinker() *linker { return &linker{fds: map[inodeKey]int{}} }

func (l *linker) close() {
	for _, fd := range l.fds {
		closeFD(fd)
	}
}

func (l *linker) link(key inodeKey, dirfd int, name string) (bool, error) {
	fd, ok := l.fds[key]
	if !ok {
		return false, nil
	}
	if err := unix.Linkat(fd, "", dirfd, name, unix.AT_EMPTY_PATH); err != nil {
		return false, fmt.Errorf("hard link: %w", err)
	}
	return true, nil
}

func (l *linker) remember(key inodeKey, dirfd int, name string) {
	if len(l.fds) >= maxLinkFDs {
		return
	}
	if fd, err := openBeneath(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW, 0); err == nil {
		l.fds[key] = fd
	}
}

// Flatten writes the merged view of s into dst, which must be an empty
// directory or not exist: whiteouts, opaque markers and redirects are
// consumed, data is reflinked where the filesystem allows, hard links
// inside one layer stay links. The result is what the kernel shows when
// it mounts the stack, as one plain directory tree.
func Flatten(ctx context.Context, s *Stack, dst string) (FlattenStats, error) {
	return s.copyOut(ctx, "", dst, true, false)
}

// CopyOut copies the merged entry at path (a file, or a whole tree) to the
// host path hostDst, which must not exist yet. Attributes the host
// filesystem cannot hold (an xattr namespace it lacks) are skipped.
func (s *Stack) CopyOut(ctx context.Context, path, hostDst string) (FlattenStats, error) {
	rel, err := cleanPath(path)
	if err != nil {
		return FlattenStats{}, fmt.Errorf("copy out: %w", err)
	}
	return s.copyOut(ctx, rel, hostDst, false, true)
}

type outCopier struct {
	v       *view
	stats   FlattenStats
	links   *linker
	lenient bool
}

func (s *Stack) copyOut(ctx context.Context, rel, hostDst string, intoEmpty, lenient bool) (FlattenStats, error) {
	v := s.newView()
	defer v.close()
	e, err := v.resolve(rel)
	if err != nil {
		return FlattenStats{}, fmt.Errorf("copy out: %w", err)
	}
	hostDst = filepath.Clean(hostDst)
	pfd, err := openDir(filepath.Dir(hostDst))
	if err != nil {
		return FlattenStats{}, fmt.Errorf("copy out %s to %s: %w", rel, hostDst, err)
	}
	defer closeFD(pfd)
	name := filepath.Base(hostDst)
	exists := false
	if intoEmpty {
		if empty, err := isEmptyDir(hostDst); err == nil && empty {
			exists = true
		} else if err == nil || !errors.Is(err, os.ErrNotExist) {
			return FlattenStats{}, fmt.Errorf("flatten into %s: not an empty directory: %w", hostDst, os.ErrExist)
		}
	}
	c := &outCopier{v: v, links: newLinker(), lenient: lenient}
	defer c.links.close()
	err = c.copy(ctx, e, pfd, name, exists)
	return c.stats, err
}

func isEmptyDir(dir string) (bool, error) {
	f, err := os.Open(dir)
	if err != nil {
		return false, err
	}
	defer f.Close()
	if _, err := f.Readdirnames(1); err == io.EOF {
		return true, nil
	} else if err != nil {
		return false, err
	}
	return false, nil
}

func (c *outCopier) copy(ctx context.Context, e Entry, dpfd int, name string, exists bool) (err error) {
	defer func() {
		var named *namedError
		if err != nil && !errors.As(err, &named) {
			err = &namedError{fmt.Errorf("copy out %s in layer %s: %w", e.Path, e.LayerDir, err)}
		}
	}()
	if err := ctx.Err(); err != nil {
		return err
	}
	root, err := c.v.root(e.Layer)
	if err != nil {
		return err
	}
	sdir, sname := parentName(e.RealPath)
	if e.RealPath == "" {
		sname = "."
	}
	spfd, err := openBeneath(root, sdir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer closeFD(spfd)
	xs, err := c.v.s.srcXattrs(procPath(spfd, sname))
	if err != nil {
		return err
	}
	switch e.Kind {
	case KindDir:
		if !exists {
			if err := unix.Mkdirat(dpfd, name, 0o700); err != nil {
				return fmt.Errorf("mkdir: %w", err)
			}
		}
		dfd, err := openBeneath(dpfd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		if err != nil {
			return err
		}
		defer closeFD(dfd)
		children, err := c.v.readDir(e)
		if err != nil {
			return err
		}
		for _, ch := range children {
			_, chName := parentName(ch.Path)
			if err := c.copy(ctx, ch, dfd, chName, false); err != nil {
				return err
			}
		}
		c.stats.Dirs++
	case KindFile:
		key := inodeKey{layer: e.Layer, dev: e.Stat.Dev, ino: e.Stat.Ino}
		if e.Stat.Nlink > 1 {
			ok, err := c.links.link(key, dpfd, name)
			if err != nil {
				return err
			}
			if ok {
				c.stats.HardLinks++
				return nil
			}
		}
		if err := c.copyFile(ctx, e, spfd, sname, dpfd, name, xs); err != nil {
			return err
		}
		if e.Stat.Nlink > 1 {
			c.links.remember(key, dpfd, name)
		}
		c.stats.Files++
	default:
		var target string
		if e.Kind == KindSymlink {
			if target, err = readlinkAt(spfd, sname); err != nil {
				return fmt.Errorf("readlink: %w", err)
			}
			c.stats.Symlinks++
		} else {
			c.stats.Specials++
		}
		if err := makeNode(dpfd, name, &e.Stat, target); err != nil {
			return fmt.Errorf("create %s: %w", e.Kind, err)
		}
	}
	if e.Kind != KindFile {
		if err := applyMeta(nameTarget(dpfd, name), &e.Stat, xs, c.lenient); err != nil {
			return err
		}
	}
	return setTimes(dpfd, name, &e.Stat)
}

func (c *outCopier) copyFile(ctx context.Context, e Entry, spfd int, sname string, dpfd int, name string, xs []xattr) error {
	sfd, err := c.v.openData(e)
	if err != nil {
		return fmt.Errorf("open source: %w", err)
	}
	defer closeFD(sfd)
	dfd, err := unix.Openat(dpfd, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	defer closeFD(dfd)
	m, n, err := copyData(ctx, dfd, sfd, e.Stat.Size, c.v.s.cfg.methods)
	if err != nil {
		return fmt.Errorf("copy data: %w", err)
	}
	c.stats.Bytes += n
	if m == MethodReflink {
		c.stats.Reflinked += n
	}
	return applyMeta(fdTarget(dfd), &e.Stat, xs, c.lenient)
}

// namedError marks an error already named with its path and layer, so
// that the recursion does not repeat every parent in front of it.
type namedError struct{ err error }

func (e *namedError) Error() string { return e.err.Error() }
func (e *namedError) Unwrap() error { return e.err }
