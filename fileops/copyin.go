package fileops

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"golang.org/x/sys/unix"
)

// CopyIn copies the host file or tree hostSrc into the upper layer at the
// merged path, like a write through the mount: parents are copied up
// first, an existing non-directory is replaced, an existing directory is
// merged into. A new entry is built under a staging name and renamed into
// place in one step; one that replaces a whiteout in the upper is made
// opaque, as overlayfs does, so the names the whiteout hid stay hidden.
// Overlay-private xattrs on host files are not carried in. Below hostSrc
// the host tree is read through descriptors, never by name (hostEntry).
//
// The merged path is walked as ResolveFollow walks it, the last symlink
// included, as open(2) on the mount would: a copy to /lib/x/f lands in
// usr/lib/x/f when /lib links to usr/lib, and a copy onto a link to a
// file replaces that file (cp and docker cp do the same). A last link
// that leads nowhere is refused, as cp refuses to write through it.
// Entries below the destination merge by name, without following links.
//
// Missing directories on the way are created like mkdir -p through the
// mount: mode 0755, owner root:root (the group and set-gid bit of a
// set-gid parent), opaque where they replace a whiteout. Names that came
// out of a link's text are never created.
func (s *Stack) CopyIn(ctx context.Context, hostSrc, path string) (FlattenStats, error) {
	if !s.hasUpper {
		return FlattenStats{}, fmt.Errorf("copy in %s: %w", path, ErrReadOnly)
	}
	src, err := openHostSource(hostSrc)
	if err != nil {
		return FlattenStats{}, fmt.Errorf("copy in %s: %w", hostSrc, err)
	}
	defer src.close()
	hst := src.st
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.newView()
	defer v.close()
	c := &inCopier{v: v, links: newLinker()}
	defer c.links.close()
	r, err := v.walk(path, true, c.mkdir(ctx))
	switch {
	case err == nil:
	case r.missing && r.viaLink:
		return FlattenStats{}, fmt.Errorf("copy in %s: not writing through a dangling symlink: %w", hostSrc, err)
	case r.missing && r.mustDir && hst.Mode&unix.S_IFMT != unix.S_IFDIR:
		return FlattenStats{}, fmt.Errorf("copy in %s to %s: %w", hostSrc, path, unix.ENOTDIR)
	case !r.missing:
		return FlattenStats{}, fmt.Errorf("copy in %s: %w", hostSrc, err)
	}
	if _, name := parentName(r.canon); isStagingName(name) {
		return FlattenStats{}, fmt.Errorf("copy in %s to %s: name reserved for staging: %w", hostSrc, r.canon, ErrInvalidPath)
	}
	err = c.copyIn(ctx, src, r.canon)
	return c.stats, err
}

// mkdir creates a missing directory of the destination path in the upper,
// as mkdir -p through the mount would.
func (c *inCopier) mkdir(ctx context.Context) mkdirFunc {
	return func(parent Entry, name string) error {
		rel := joinRel(parent.Path, name)
		if isStagingName(name) {
			return fmt.Errorf("mkdir %s: name reserved for staging: %w", rel, ErrInvalidPath)
		}
		if parent.Path != "" {
			if _, _, err := c.v.copyUp(ctx, parent.Path); err != nil {
				return err
			}
		}
		st := unix.Stat_t{Mode: unix.S_IFDIR | 0o755}
		if parent.Stat.Mode&unix.S_ISGID != 0 {
			st.Gid = parent.Stat.Gid
			st.Mode |= unix.S_ISGID
		}
		err := c.place(rel, true, func(sd int, tmp string) (int, error) {
			fd, err := makeNode(sd, tmp, &st, "")
			if err != nil {
				return -1, fmt.Errorf("mkdir %s: %w", rel, err)
			}
			if err := applyMeta(fd, &st, nil, false); err != nil {
				return fd, fmt.Errorf("mkdir %s: %w", rel, err)
			}
			return fd, nil
		})
		if err == nil {
			c.stats.Dirs++
		}
		return err
	}
}

type inCopier struct {
	v     *view
	stats FlattenStats
	links *linker
}

func (c *inCopier) copyIn(ctx context.Context, src *hostEntry, rel string) error {
	srcIsDir := src.isDir()
	e, err := c.v.resolve(rel)
	switch {
	case err == nil && e.Kind == KindDir:
		if !srcIsDir {
			return fmt.Errorf("copy in %s to %s: %w", src.path, rel, unix.EISDIR)
		}
		if _, _, err := c.v.copyUp(ctx, rel); err != nil {
			return err
		}
		return src.eachChild(func(child *hostEntry) error {
			return c.copyIn(ctx, child, joinRel(rel, child.name))
		})
	case err == nil && srcIsDir:
		return fmt.Errorf("copy in %s to %s (a %s in layer %s): %w", src.path, rel, e.Kind, e.LayerDir, unix.ENOTDIR)
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("copy in %s: %w", src.path, err)
	}
	if rel == "" {
		return fmt.Errorf("copy in %s over the root: %w", src.path, unix.EINVAL)
	}
	if err := c.v.copyUpParents(ctx, rel); err != nil {
		return err
	}
	return c.place(rel, srcIsDir, func(sd int, tmp string) (int, error) {
		return c.copyHost(ctx, src, sd, tmp)
	})
}

// place builds a new entry through build under a staging name and renames
// it over rel in the upper, replacing a non-directory or a whiteout there.
// build returns the entry open (-1 if it made none), and it is through that
// handle, never the staging name, that place finishes and checks it: a
// container sees the staging name in its upper and may swap it.
func (c *inCopier) place(rel string, isDir bool, build func(sd int, tmp string) (int, error)) error {
	s := c.v.s
	upperRoot, err := c.v.root(0)
	if err != nil {
		return err
	}
	pdir, name := parentName(rel)
	pfd, err := openBeneath(upperRoot, pdir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return fmt.Errorf("place %s: open upper parent %s in layer %s: %w", rel, pdir, s.layers[0], err)
	}
	defer closeFD(pfd)
	// What the upper holds at that name now decides whether a new
	// directory must be opaque.
	hidden := false
	var ust unix.Stat_t
	if unix.Fstatat(pfd, name, &ust, unix.AT_SYMLINK_NOFOLLOW) == nil {
		if ust.Mode&unix.S_IFMT == unix.S_IFDIR {
			return fmt.Errorf("place %s in layer %s: a hidden directory is there: %w", rel, s.layers[0], unix.EEXIST)
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
		return fmt.Errorf("place %s: open staging dir: %w", rel, err)
	}
	defer closeFD(sd)
	tmp := newStagingName()
	defer releaseStagingName(tmp)
	fd, err := build(sd, tmp)
	defer closeFD(fd)
	if err != nil {
		removeStaged(sd, tmp, fd)
		return err
	}
	if isDir && (hidden || tarWhiteout) {
		var err error
		if s.cfg.tarWhiteouts {
			var mfd int
			mfd, err = unix.Openat(fd, tarOpaqueMarker, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
			closeFD(mfd)
		} else {
			err = unix.Setxattr(fdPath(fd), s.prefix()+"opaque", []byte("y"), 0)
		}
		if err != nil {
			removeStaged(sd, tmp, fd)
			return fmt.Errorf("place %s: mark it opaque in layer %s: %w", rel, s.layers[0], err)
		}
	}
	var flags uint
	occupied := ust.Mode != 0
	if isDir && occupied {
		// rename(2) cannot put a dir over a non-dir; swap them in one step
		// and remove what came back, as overlayfs does over a whiteout.
		flags = unix.RENAME_EXCHANGE
	}
	if stagedHook != nil {
		stagedHook()
	}
	// Only the entry built here may be renamed into place. A swap between
	// this check and the rename moves an entry of the container's own
	// upper within it, which the container could do itself; the check
	// after the rename then fails the copy.
	if err := checkEntry(sd, tmp, fd); err != nil {
		return fmt.Errorf("place %s in layer %s: staged entry %w", rel, s.layers[0], err)
	}
	if err := unix.Renameat2(sd, tmp, pfd, name, flags); err != nil {
		removeStaged(sd, tmp, fd)
		return fmt.Errorf("place %s: rename into layer %s: %w", rel, s.layers[0], err)
	}
	if err := checkEntry(pfd, name, fd); err != nil {
		return fmt.Errorf("place %s in layer %s: %w", rel, s.layers[0], err)
	}
	if flags == unix.RENAME_EXCHANGE {
		// Only what was there before goes: a name the container filled
		// since is its own.
		var st unix.Stat_t
		if unix.Fstatat(sd, tmp, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Dev == ust.Dev && st.Ino == ust.Ino {
			if err := unix.Unlinkat(sd, tmp, 0); err != nil {
				return fmt.Errorf("place %s: remove what it replaced in layer %s: %w", rel, s.layers[0], err)
			}
		}
	}
	if tarWhiteout {
		if err := unix.Unlinkat(pfd, tarWhiteoutPrefix+name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("place %s: remove its whiteout in layer %s: %w", rel, s.layers[0], err)
		}
	}
	return nil
}

// copyHost copies one host entry (recursively for a directory) to
// dirfd/name, which must not exist, and returns the new entry open (or -1
// if it made none), on error too, so that the caller can remove it.
func (c *inCopier) copyHost(ctx context.Context, src *hostEntry, dirfd int, name string) (fd int, err error) {
	fd = -1
	if err := ctx.Err(); err != nil {
		return fd, err
	}
	defer func() {
		var named *namedError
		if err != nil && !errors.As(err, &named) {
			err = &namedError{fmt.Errorf("copy in %s: %w", src.path, err)}
		}
	}()
	st := src.st
	xs, err := c.v.s.srcXattrs(src.xattrPath())
	if err != nil {
		return fd, err
	}
	key := inodeKey{layer: -1, dev: st.Dev, ino: st.Ino}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if fd, err = makeNode(dirfd, name, &st, ""); err != nil {
			return fd, err
		}
		err := src.eachChild(func(child *hostEntry) error {
			cfd, err := c.copyHost(ctx, child, fd, child.name)
			closeFD(cfd)
			return err
		})
		if err != nil {
			return fd, err
		}
		c.stats.Dirs++
	case unix.S_IFREG:
		if st.Nlink > 1 {
			if fd, err = c.links.link(key, dirfd, name); err != nil || fd >= 0 {
				c.stats.HardLinks++
				return fd, err
			}
		}
		sfd, err := src.openData()
		if err != nil {
			return fd, err
		}
		defer closeFD(sfd)
		if fd, err = unix.Openat(dirfd, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600); err != nil {
			return -1, err
		}
		created(dirfd, name)
		m, n, err := copyData(ctx, fd, sfd, st.Size, c.v.s.cfg.methods)
		if err != nil {
			return fd, err
		}
		if !c.v.s.cfg.volatile {
			if err := unix.Fsync(fd); err != nil {
				return fd, err
			}
		}
		c.stats.Files++
		c.stats.count(m, n)
		if st.Nlink > 1 {
			c.links.remember(key, fd)
		}
	default:
		var target string
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if target, err = src.readlink(); err != nil {
				return fd, err
			}
			c.stats.Symlinks++
		} else {
			c.stats.Specials++
		}
		if fd, err = makeNode(dirfd, name, &st, target); err != nil {
			return fd, err
		}
	}
	if err := applyMeta(fd, &st, xs, false); err != nil {
		return fd, err
	}
	return fd, setTimes(fd, &st)
}
