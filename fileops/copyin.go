package fileops

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// CopyIn copies the host file or tree hostSrc into the upper layer at the
// merged path, like a write through the mount: parents are copied up
// first, an existing non-directory is replaced, an existing directory is
// merged into. A new entry is built under a staging name and renamed into
// place in one step; one that replaces a whiteout in the upper is made
// opaque, as overlayfs does, so the names the whiteout hid stay hidden.
// Overlay-private xattrs on host files are not carried in.
func (s *Stack) CopyIn(ctx context.Context, hostSrc, path string) (FlattenStats, error) {
	if !s.hasUpper {
		return FlattenStats{}, fmt.Errorf("copy in %s: %w", path, ErrReadOnly)
	}
	rel, err := cleanPath(path)
	if err != nil {
		return FlattenStats{}, fmt.Errorf("copy in: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.newView()
	defer v.close()
	c := &inCopier{v: v, links: newLinker()}
	defer c.links.close()
	err = c.copyIn(ctx, filepath.Clean(hostSrc), rel)
	return c.stats, err
}

type inCopier struct {
	v     *view
	stats FlattenStats
	links *linker
}

func (c *inCopier) copyIn(ctx context.Context, hostSrc, rel string) error {
	var hst unix.Stat_t
	if err := unix.Lstat(hostSrc, &hst); err != nil {
		return fmt.Errorf("copy in %s: %w", hostSrc, err)
	}
	srcIsDir := hst.Mode&unix.S_IFMT == unix.S_IFDIR
	e, err := c.v.resolve(rel)
	switch {
	case err == nil && e.Kind == KindDir:
		if !srcIsDir {
			return fmt.Errorf("copy in %s to %s: %w", hostSrc, rel, unix.EISDIR)
		}
		if _, _, err := c.v.copyUp(ctx, rel); err != nil {
			return err
		}
		ents, err := os.ReadDir(hostSrc)
		if err != nil {
			return fmt.Errorf("copy in %s: %w", hostSrc, err)
		}
		for _, de := range ents {
			if err := c.copyIn(ctx, filepath.Join(hostSrc, de.Name()), joinRel(rel, de.Name())); err != nil {
				return err
			}
		}
		return nil
	case err == nil && srcIsDir:
		return fmt.Errorf("copy in %s to %s (a %s in layer %s): %w", hostSrc, rel, e.Kind, e.LayerDir, unix.ENOTDIR)
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("copy in %s: %w", hostSrc, err)
	}
	if rel == "" {
		return fmt.Errorf("copy in %s over the root: %w", hostSrc, unix.EINVAL)
	}
	if err := c.v.copyUpParents(ctx, rel); err != nil {
		return err
	}
	return c.place(ctx, hostSrc, &hst, rel)
}

// place builds hostSrc under a staging name and renames it over rel in
// the upper, replacing a non-directory or a whiteout there.
func (c *inCopier) place(ctx context.Context, hostSrc string, hst *unix.Stat_t, rel string) error {
	s := c.v.s
	upperRoot, err := c.v.root(0)
	if err != nil {
		return err
	}
	pdir, name := parentName(rel)
	pfd, err := openBeneath(upperRoot, pdir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return fmt.Errorf("copy in %s: open upper parent %s in layer %s: %w", hostSrc, pdir, s.layers[0], err)
	}
	defer closeFD(pfd)
	// What the upper holds at that name now decides whether a new
	// directory must be opaque.
	hidden := false
	var ust unix.Stat_t
	if unix.Fstatat(pfd, name, &ust, unix.AT_SYMLINK_NOFOLLOW) == nil {
		if ust.Mode&unix.S_IFMT == unix.S_IFDIR {
			return fmt.Errorf("copy in %s: %s in layer %s is a hidden directory: %w", hostSrc, rel, s.layers[0], unix.EEXIST)
		}
		hidden, err = c.v.isWhiteout(pfd, name, &ust)
		if err != nil {
			return err
		}
	}
	tarWhiteout := false
	if s.cfg.tarWhiteouts {
		var wst unix.Stat_t
		tarWhiteout = unix.Fstatat(pfd, tarWhiteoutPrefix+name, &wst, unix.AT_SYMLINK_NOFOLLOW) == nil
	}
	sd, err := c.v.stageDir(pfd)
	if err != nil {
		return fmt.Errorf("copy in %s: open staging dir: %w", hostSrc, err)
	}
	defer closeFD(sd)
	tmp := tmpName()
	isDir := hst.Mode&unix.S_IFMT == unix.S_IFDIR
	if err := c.copyHost(ctx, hostSrc, sd, tmp); err != nil {
		if isDir {
			_ = os.RemoveAll(procPath(sd, tmp))
		} else {
			removeStaged(sd, tmp, false)
		}
		return err
	}
	if isDir && (hidden || tarWhiteout) {
		var err error
		if s.cfg.tarWhiteouts {
			var fd int
			fd, err = unix.Openat(sd, tmp+"/"+tarOpaqueMarker, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
			closeFD(fd)
		} else {
			err = unix.Lsetxattr(procPath(sd, tmp), s.prefix()+"opaque", []byte("y"), 0)
		}
		if err != nil {
			_ = os.RemoveAll(procPath(sd, tmp))
			return fmt.Errorf("copy in %s: mark %s opaque in layer %s: %w", hostSrc, rel, s.layers[0], err)
		}
	}
	var flags uint
	occupied := ust.Mode != 0
	if isDir && occupied {
		// rename(2) cannot put a dir over a non-dir; swap them in one step
		// and remove what came back, as overlayfs does over a whiteout.
		flags = unix.RENAME_EXCHANGE
	}
	if err := unix.Renameat2(sd, tmp, pfd, name, flags); err != nil {
		if isDir {
			_ = os.RemoveAll(procPath(sd, tmp))
		} else {
			removeStaged(sd, tmp, false)
		}
		return fmt.Errorf("copy in %s: rename into %s in layer %s: %w", hostSrc, rel, s.layers[0], err)
	}
	if flags == unix.RENAME_EXCHANGE {
		if err := unix.Unlinkat(sd, tmp, 0); err != nil {
			return fmt.Errorf("copy in %s: remove replaced %s in layer %s: %w", hostSrc, rel, s.layers[0], err)
		}
	}
	if tarWhiteout {
		if err := unix.Unlinkat(pfd, tarWhiteoutPrefix+name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("copy in %s: remove whiteout of %s in layer %s: %w", hostSrc, rel, s.layers[0], err)
		}
	}
	return nil
}

// copyHost copies one host entry (recursively for a directory) to
// dirfd/name, which must not exist.
func (c *inCopier) copyHost(ctx context.Context, src string, dirfd int, name string) (err error) {
	if err := ctx.Err(); err != nil {
		return err
	}
	defer func() {
		var named *namedError
		if err != nil && !errors.As(err, &named) {
			err = &namedError{fmt.Errorf("copy in %s: %w", src, err)}
		}
	}()
	var st unix.Stat_t
	if err := unix.Lstat(src, &st); err != nil {
		return err
	}
	xs, err := c.v.s.srcXattrs(src)
	if err != nil {
		return err
	}
	key := inodeKey{layer: -1, dev: st.Dev, ino: st.Ino}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if err := unix.Mkdirat(dirfd, name, 0o700); err != nil {
			return err
		}
		dfd, err := openBeneath(dirfd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		if err != nil {
			return err
		}
		defer closeFD(dfd)
		ents, err := os.ReadDir(src)
		if err != nil {
			return err
		}
		for _, de := range ents {
			if err := c.copyHost(ctx, filepath.Join(src, de.Name()), dfd, de.Name()); err != nil {
				return err
			}
		}
		c.stats.Dirs++
	case unix.S_IFREG:
		if st.Nlink > 1 {
			if ok, err := c.links.link(key, dirfd, name); err != nil || ok {
				c.stats.HardLinks++
				return err
			}
		}
		sfd, err := unix.Open(src, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer closeFD(sfd)
		dfd, err := unix.Openat(dirfd, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		defer closeFD(dfd)
		m, n, err := copyData(ctx, dfd, sfd, st.Size, c.v.s.cfg.methods)
		if err != nil {
			return err
		}
		if !c.v.s.cfg.volatile {
			if err := unix.Fsync(dfd); err != nil {
				return err
			}
		}
		if err := applyMeta(fdTarget(dfd), &st, xs, false); err != nil {
			return err
		}
		c.stats.Files++
		c.stats.Bytes += n
		if m == MethodReflink {
			c.stats.Reflinked += n
		}
		if st.Nlink > 1 {
			c.links.remember(key, dirfd, name)
		}
		return setTimes(dirfd, name, &st)
	default:
		var target string
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if target, err = os.Readlink(src); err != nil {
				return err
			}
			c.stats.Symlinks++
		} else {
			c.stats.Specials++
		}
		if err := makeNode(dirfd, name, &st, target); err != nil {
			return err
		}
	}
	if err := applyMeta(nameTarget(dirfd, name), &st, xs, false); err != nil {
		return err
	}
	return setTimes(dirfd, name, &st)
}
