package fileops

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// FlattenStats counts what a Flatten or CopyOut wrote.
type FlattenStats struct {
	Dirs, Files, Symlinks, Specials, HardLinks int
	Bytes                                      int64 // file data written or shared
	Reflinked                                  int64 // of Bytes, shared by reflink
	// CopyFileRanged and ReadWritten are the rest of Bytes, by the method
	// that copied them: in the kernel, or through userspace.
	CopyFileRanged, ReadWritten int64
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

// link makes dirfd/name a hard link of the copy of key made before, if
// there is one, and returns it open (-1 if there is none).
func (l *linker) link(key inodeKey, dirfd int, name string) (int, error) {
	fd, ok := l.fds[key]
	if !ok {
		return -1, nil
	}
	if err := unix.Linkat(fd, "", dirfd, name, unix.AT_EMPTY_PATH); err != nil {
		return -1, fmt.Errorf("hard link: %w", err)
	}
	return unix.Dup(fd)
}

// remember keeps the copy open as fd for the hard links to come. It holds
// a handle of its own on that inode, not the name, which another process
// may have swapped by the time the next link is made.
func (l *linker) remember(key inodeKey, fd int) {
	if len(l.fds) >= maxLinkFDs {
		return
	}
	if lfd, err := unix.Open(fdPath(fd), unix.O_PATH|unix.O_CLOEXEC, 0); err == nil {
		l.fds[key] = lfd
	}
}

// Flatten writes the merged view of s into dst, which must be an empty
// directory or not exist: whiteouts, opaque markers and redirects are
// consumed, data is reflinked where the filesystem allows, hard links
// inside one layer stay links. The result is what the kernel shows when
// it mounts the stack, as one plain directory tree.
//
// A name that the merged view lists but cannot look up (see ReadDir's
// Err) stops Flatten with an error naming its merged path: the kernel
// would fail to read it too, and a layer silently missing an entry is
// worse than no layer. dst is then left partly written for the caller to
// remove.
func Flatten(ctx context.Context, s *Stack, dst string, opts ...FlattenOpt) (FlattenStats, error) {
	var cfg flattenConfig
	for _, o := range opts {
		o(&cfg)
	}
	return s.copyOut(ctx, "", dst, true, false, cfg.owners)
}

// capabilityXattr holds a file's capabilities, which may name their
// owner (see OwnerMap).
const capabilityXattr = "security.capability"

// FlattenOpt configures a Flatten.
type FlattenOpt func(*flattenConfig)

type flattenConfig struct {
	owners OwnerMap
}

// OwnerMap gives a copied entry the owner it is to have instead of its
// source's, and the security.capability value to go with it (nil when the
// source has none): the capability names the user namespace root it
// belongs to, so a copy for another namespace may have to carry another.
type OwnerMap func(uid, gid uint32, capability []byte) (newUID, newGID uint32, newCapability []byte, err error)

// WithOwnerMap makes Flatten create every entry with the owner m gives
// it, as a copy for a user namespace needs. The owner is set on the
// descriptor of the entry just made, in the order applyMeta keeps for any
// copy, so set-id bits and capabilities survive it: no second walk
// changes owners afterwards.
func WithOwnerMap(m OwnerMap) FlattenOpt {
	return func(c *flattenConfig) { c.owners = m }
}

// CopyOut copies the merged entry at path (a file, or a whole tree) to the
// host path hostDst. Attributes the host filesystem cannot hold (an xattr
// namespace it lacks) are skipped.
//
// The merged path is walked as ResolveFollow walks it, symlinks on the way
// followed inside the merged root (so /lib/x86_64-linux-gnu/libc.so.6
// works where /lib is a link to usr/lib), but a symlink as the last
// component is copied as the link itself, like cp -P; a path ending in "/"
// follows it, like cp -a LINK/ DST.
//
// When hostDst is an existing directory the entry is copied into it under
// its own name (the last component of path), like cp -a SRC DIR/ and
// nerdctl cp; that name must not exist there yet. Otherwise hostDst must
// not exist and becomes the copy.
func (s *Stack) CopyOut(ctx context.Context, path, hostDst string) (FlattenStats, error) {
	return s.copyOut(ctx, path, hostDst, false, true, nil)
}

type outCopier struct {
	v       *view
	stats   FlattenStats
	links   *linker
	lenient bool
	owners  OwnerMap
}

func (s *Stack) copyOut(ctx context.Context, path, hostDst string, intoEmpty, lenient bool, owners OwnerMap) (FlattenStats, error) {
	v := s.newView()
	defer v.close()
	r, err := v.walk(path, false, nil)
	if err != nil {
		return FlattenStats{}, fmt.Errorf("copy out: %w", err)
	}
	e := r.e
	hostDst = filepath.Clean(hostDst)
	if !intoEmpty {
		if fi, err := os.Stat(hostDst); err == nil && fi.IsDir() {
			name := outName(path, e)
			if name == "" {
				return FlattenStats{}, fmt.Errorf("copy out the root into existing directory %s (Flatten copies a whole view): %w", hostDst, os.ErrExist)
			}
			hostDst = filepath.Join(hostDst, name)
		}
	}
	pfd, err := openDir(filepath.Dir(hostDst))
	if err != nil {
		return FlattenStats{}, fmt.Errorf("copy out %s to %s: %w", e.Path, hostDst, err)
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
	c := &outCopier{v: v, links: newLinker(), lenient: lenient, owners: owners}
	defer c.links.close()
	err = c.copy(ctx, e, pfd, name, exists, nil)
	return c.stats, err
}

// outName is the name a copy into a directory gets: the last component
// of the path as the caller wrote it (a link keeps its own name), or, for
// a path ending in "." or "..", the name of the directory reached. The
// root has none.
func outName(path string, e Entry) string {
	name := filepath.Base(strings.TrimRight(path, "/"))
	if name == "." || name == ".." || name == "/" || strings.TrimRight(path, "/") == "" {
		_, name = parentName(e.Path)
	}
	return name
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

// srcDirs holds the source directories of one directory's entries open
// while they are copied: each layer's part of a merged directory is one
// directory, opened once for all its entries, not once per entry.
type srcDirs map[srcDir]int

type srcDir struct {
	layer int
	dir   string
}

// maxSrcDirs caps the directories one srcDirs keeps open: a directory in
// each of hundreds of layers, at every depth of the walk, would otherwise
// hold thousands of descriptors.
const maxSrcDirs = 16

// open returns layer's dir open as O_PATH, beneath root, and whether d
// keeps it (until close); if not, the caller closes it.
func (d srcDirs) open(root, layer int, dir string) (int, bool, error) {
	if fd, ok := d[srcDir{layer, dir}]; ok {
		return fd, true, nil
	}
	fd, err := openBeneath(root, dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil || len(d) >= maxSrcDirs {
		return fd, false, err
	}
	d[srcDir{layer, dir}] = fd
	return fd, true, nil
}

func (d srcDirs) close() {
	for _, fd := range d {
		closeFD(fd)
	}
}

// copy copies entry e as dpfd/name; dirs, when not nil, holds the source
// directories of e and its siblings.
func (c *outCopier) copy(ctx context.Context, e Entry, dpfd int, name string, exists bool, dirs srcDirs) (err error) {
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
	if dirs == nil {
		dirs = srcDirs{}
		defer dirs.close()
	}
	spfd, kept, err := dirs.open(root, e.Layer, sdir)
	if err != nil {
		return err
	}
	if !kept {
		defer closeFD(spfd)
	}
	xs, err := c.v.s.srcXattrs(procPath(spfd, sname))
	if err != nil {
		return err
	}
	var fd int
	if e.Kind != KindFile {
		if xs, err = c.mapOwner(&e, xs); err != nil {
			return err
		}
	}
	switch e.Kind {
	case KindDir:
		if exists {
			fd, err = openBeneath(dpfd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		} else {
			fd, err = makeNode(dpfd, name, &e.Stat, "")
		}
		if err != nil {
			return fmt.Errorf("mkdir: %w", err)
		}
		defer closeFD(fd)
		children, err := c.v.readDir(e)
		if err != nil {
			return err
		}
		chDirs := srcDirs{}
		defer chDirs.close()
		for _, ch := range children {
			if ch.Err != nil {
				// The kernel lists the name but fails to stat it, so a
				// copy of the mount would miss it too. A flattened layer
				// that silently lacks an entry is worse than none: stop.
				return &namedError{fmt.Errorf("copy out %s: %w", ch.Path, ch.Err)}
			}
			_, chName := parentName(ch.Path)
			if err := c.copy(ctx, ch, fd, chName, false, chDirs); err != nil {
				return err
			}
		}
		c.stats.Dirs++
	case KindFile:
		key := inodeKey{layer: e.Layer, dev: e.Stat.Dev, ino: e.Stat.Ino}
		if e.Stat.Nlink > 1 {
			fd, err := c.links.link(key, dpfd, name)
			if err != nil {
				return err
			}
			if fd >= 0 {
				closeFD(fd)
				c.stats.HardLinks++
				return nil
			}
		}
		// Mapped once per inode: a hard link is made above.
		if xs, err = c.mapOwner(&e, xs); err != nil {
			return err
		}
		if fd, err = c.copyFile(ctx, e, dpfd, name, xs, spfd, sname); err != nil {
			return err
		}
		defer closeFD(fd)
		if e.Stat.Nlink > 1 {
			c.links.remember(key, fd)
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
		if fd, err = makeNode(dpfd, name, &e.Stat, target); err != nil {
			return fmt.Errorf("create %s: %w", e.Kind, err)
		}
		defer closeFD(fd)
	}
	if e.Kind != KindFile {
		if err := applyMeta(fd, &e.Stat, xs, c.lenient); err != nil {
			return err
		}
	}
	if err := setTimes(fd, &e.Stat); err != nil {
		return err
	}
	// The destination may be a directory others write (a CopyOut to
	// /tmp): whoever swapped a name there got nothing of ours through it,
	// but the copy is not what it claims to be.
	return checkEntry(dpfd, name, fd)
}

// mapOwner gives e (a copy of the entry, not shared with the view) the
// owner and the capability the copy is to have instead of its source's,
// when the copy has an OwnerMap.
func (c *outCopier) mapOwner(e *Entry, xs []xattr) ([]xattr, error) {
	if c.owners == nil {
		return xs, nil
	}
	ci := -1
	var caps []byte
	for i, x := range xs {
		if x.name == capabilityXattr {
			ci, caps = i, x.value
		}
	}
	uid, gid, caps, err := c.owners(e.Stat.Uid, e.Stat.Gid, caps)
	if err != nil {
		return nil, fmt.Errorf("map owner %d:%d: %w", e.Stat.Uid, e.Stat.Gid, err)
	}
	e.Stat.Uid, e.Stat.Gid = uid, gid
	if ci >= 0 {
		out := append([]xattr(nil), xs...)
		if caps == nil {
			out = append(out[:ci], out[ci+1:]...)
		} else {
			out[ci].value = caps
		}
		return out, nil
	}
	return xs, nil
}

// copyFile writes the file entry e, which is spfd/sname in its layer, as
// dpfd/name and returns it open.
func (c *outCopier) copyFile(ctx context.Context, e Entry, dpfd int, name string, xs []xattr, spfd int, sname string) (int, error) {
	var sfd int
	var err error
	if e.DataLayer == e.Layer && e.DataPath == e.RealPath {
		// The data is the entry's own: its directory is open already.
		sfd, err = openSource(spfd, sname)
	} else {
		sfd, err = c.v.openData(e) // a metacopy file's data is below
	}
	if err != nil {
		return -1, fmt.Errorf("open source: %w", err)
	}
	defer closeFD(sfd)
	dfd, err := unix.Openat(dpfd, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return -1, fmt.Errorf("create: %w", err)
	}
	created(dpfd, name)
	m, n, err := copyData(ctx, dfd, sfd, e.Stat.Size, c.v.s.cfg.methods)
	if err == nil {
		c.stats.count(m, n)
		err = applyMeta(dfd, &e.Stat, xs, c.lenient)
	}
	if err != nil {
		closeFD(dfd)
		return -1, err
	}
	return dfd, nil
}

// namedError marks an error already named with its path and layer, so
// that the recursion does not repeat every parent in front of it.
type namedError struct{ err error }

func (e *namedError) Error() string { return e.err.Error() }
func (e *namedError) Unwrap() error { return e.err }

// count adds n bytes copied by method m.
func (st *FlattenStats) count(m Method, n int64) {
	st.Bytes += n
	switch m {
	case MethodReflink:
		st.Reflinked += n
	case MethodCopyFileRange:
		st.CopyFileRanged += n
	case MethodReadWrite:
		st.ReadWritten += n
	}
}
