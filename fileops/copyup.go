package fileops

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// CopyUp makes the entry at path live in the upper layer, as overlayfs'
// copy-up does before a write: parents first (each with its own mode,
// owner, xattrs and times), then the entry with its data, metadata and
// overlay-foreign xattrs. Nothing is done for an entry already in the
// upper. The new entry appears in one step: a regular file is written as
// an O_TMPFILE and linked in, anything else is built under a staging name
// (in the work dir, if one is set) and renamed into place.
func (s *Stack) CopyUp(ctx context.Context, path string) (CopyResult, error) {
	if !s.hasUpper {
		return CopyResult{}, fmt.Errorf("copy up %s: %w", path, ErrReadOnly)
	}
	rel, err := cleanPath(path)
	if err != nil {
		return CopyResult{}, fmt.Errorf("copy up: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.newView()
	defer v.close()
	res, _, err := v.copyUp(ctx, rel)
	return res, err
}

// copyUp returns the entry as it is after the copy-up, now in the upper.
func (v *view) copyUp(ctx context.Context, rel string) (CopyResult, Entry, error) {
	e, err := v.resolve(rel)
	if err != nil {
		return CopyResult{}, Entry{}, fmt.Errorf("copy up: %w", err)
	}
	if e.InUpper(v.s) && e.Metacopy {
		res, err := v.copyUpData(ctx, e)
		return res, e, err
	}
	if e.InUpper(v.s) {
		return CopyResult{Method: MethodNone}, e, nil
	}
	if err := v.copyUpParents(ctx, rel); err != nil {
		return CopyResult{}, Entry{}, err
	}
	res, err := v.copyUpEntry(ctx, e)
	if err != nil {
		return res, Entry{}, err
	}
	e, err = v.resolve(rel)
	if err != nil {
		return res, Entry{}, fmt.Errorf("copy up: %w", err)
	}
	return res, e, nil
}

func (v *view) copyUpParents(ctx context.Context, rel string) error {
	dir, _ := parentName(rel)
	comps := splitPath(dir)
	for i := range comps {
		p := strings.Join(comps[:i+1], "/")
		e, err := v.resolve(p)
		if err != nil {
			return fmt.Errorf("copy up parent: %w", err)
		}
		if e.InUpper(v.s) {
			if e.Kind != KindDir {
				return fmt.Errorf("copy up parent %s in layer %s: %w", p, e.LayerDir, unix.ENOTDIR)
			}
			continue
		}
		if e.Kind != KindDir {
			return fmt.Errorf("copy up parent %s in layer %s: %w", p, e.LayerDir, unix.ENOTDIR)
		}
		if _, err := v.copyUpEntry(ctx, e); err != nil {
			return err
		}
	}
	return nil
}

// copyUpEntry copies one lower entry into the already existing upper
// parent directory.
func (v *view) copyUpEntry(ctx context.Context, e Entry) (res CopyResult, err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("copy up %s in layer %s: %w", e.Path, e.LayerDir, err)
		}
	}()
	if err := ctx.Err(); err != nil {
		return res, err
	}
	pfd, name, pst, err := v.openUpperParent(e.Path)
	if err != nil {
		return res, err
	}
	defer closeFD(pfd)
	srcRoot, err := v.root(e.Layer)
	if err != nil {
		return res, err
	}
	sdir, sname := parentName(e.RealPath)
	spfd, err := openBeneath(srcRoot, sdir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return res, err
	}
	defer closeFD(spfd)
	xs, err := v.s.srcXattrs(procPath(spfd, sname))
	if err != nil {
		return res, err
	}
	if e.Kind == KindFile {
		res, err = v.copyUpFile(ctx, e, pfd, name, xs)
	} else {
		res, err = v.copyUpNode(e, spfd, sname, pfd, name, xs)
	}
	if err != nil {
		return res, err
	}
	// Creating the child changed the upper parent's times; overlayfs puts
	// them back, so a copy-up is invisible in the parent's stat.
	return res, setTimes(pfd, &pst)
}

func openSource(dirfd int, name string) (int, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NOATIME|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EPERM) {
		// O_NOATIME needs ownership or CAP_FOWNER.
		fd, err = unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}
	return fd, err
}

func (v *view) copyUpFile(ctx context.Context, e Entry, pfd int, name string, xs []xattr) (CopyResult, error) {
	key := inodeKey{layer: e.Layer, dev: e.Stat.Dev, ino: e.Stat.Ino}
	if e.Stat.Nlink > 1 {
		if ok, err := v.linkUp(key, pfd, name); err != nil || ok {
			return CopyResult{Method: MethodHardLink}, err
		}
	}
	sfd, err := v.openData(e)
	if err != nil {
		return CopyResult{}, fmt.Errorf("open source: %w", err)
	}
	defer closeFD(sfd)
	f, err := v.stageFile(pfd)
	if err != nil {
		return CopyResult{}, err
	}
	defer f.close()
	m, n, err := copyData(ctx, f.fd, sfd, e.Stat.Size, v.s.cfg.methods)
	if err != nil {
		return CopyResult{}, fmt.Errorf("copy data: %w", err)
	}
	// Data must be on disk before the name is: a power cut must not leave
	// a complete-looking file with zero-length data.
	if !v.s.cfg.volatile {
		if err := unix.Fsync(f.fd); err != nil {
			return CopyResult{}, fmt.Errorf("fsync: %w", err)
		}
	}
	if err := applyMeta(f.fd, &e.Stat, xs, false); err != nil {
		return CopyResult{}, err
	}
	if err := f.place(pfd, name); err != nil {
		return CopyResult{}, err
	}
	if err := setTimes(f.fd, &e.Stat); err != nil {
		return CopyResult{}, err
	}
	if e.Stat.Nlink > 1 {
		var st unix.Stat_t
		if unix.Fstat(f.fd, &st) == nil {
			v.s.links[key] = upperLink{rel: e.Path, ino: st.Ino}
		}
	}
	return CopyResult{Method: m, Bytes: n}, nil
}

// linkUp links name to an earlier copy-up of the same lower inode, if that
// copy is still there and still the same inode.
func (v *view) linkUp(key inodeKey, pfd int, name string) (bool, error) {
	l, ok := v.s.links[key]
	if !ok {
		return false, nil
	}
	upperRoot, err := v.root(0)
	if err != nil {
		return false, err
	}
	fd, err := openBeneath(upperRoot, l.rel, unix.O_PATH|unix.O_NOFOLLOW, 0)
	if err != nil {
		delete(v.s.links, key)
		return false, nil
	}
	defer closeFD(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Ino != l.ino {
		delete(v.s.links, key)
		return false, nil
	}
	if err := unix.Linkat(fd, "", pfd, name, unix.AT_EMPTY_PATH); err != nil {
		return false, fmt.Errorf("link to %s: %w", l.rel, err)
	}
	return true, nil
}

func (v *view) copyUpNode(e Entry, spfd int, sname string, pfd int, name string, xs []xattr) (CopyResult, error) {
	var linkTarget string
	if e.Kind == KindSymlink {
		t, err := readlinkAt(spfd, sname)
		if err != nil {
			return CopyResult{}, fmt.Errorf("readlink: %w", err)
		}
		linkTarget = t
	}
	sd, err := v.stageDir(pfd)
	if err != nil {
		return CopyResult{}, fmt.Errorf("open staging dir: %w", err)
	}
	defer closeFD(sd)
	tmp := newStagingName()
	defer releaseStagingName(tmp)
	fd, err := makeNode(sd, tmp, &e.Stat, linkTarget)
	if err != nil {
		return CopyResult{}, fmt.Errorf("create %s: %w", e.Kind, err)
	}
	defer closeFD(fd)
	if err := applyMeta(fd, &e.Stat, xs, false); err != nil {
		removeStaged(sd, tmp, fd)
		return CopyResult{}, err
	}
	if stagedHook != nil {
		stagedHook()
	}
	// Without a work dir the staging name is in the upper, where a running
	// container can swap it: only the entry built here goes into place
	// (see inCopier.place).
	if err := checkEntry(sd, tmp, fd); err != nil {
		return CopyResult{}, fmt.Errorf("staged entry %w", err)
	}
	if err := unix.Renameat2(sd, tmp, pfd, name, unix.RENAME_NOREPLACE); err != nil {
		removeStaged(sd, tmp, fd)
		return CopyResult{}, fmt.Errorf("rename into upper: %w", err)
	}
	if err := checkEntry(pfd, name, fd); err != nil {
		return CopyResult{}, err
	}
	return CopyResult{Method: MethodNone}, setTimes(fd, &e.Stat)
}

// openUpperParent opens the upper's directory that holds path, which must
// exist there already, and returns it with path's last name and the
// directory's stat: a copy-up puts the parent's times back afterwards, as
// overlayfs does, so that it is invisible in the parent's stat.
func (v *view) openUpperParent(path string) (pfd int, name string, pst unix.Stat_t, err error) {
	upperRoot, err := v.root(0)
	if err != nil {
		return -1, "", pst, err
	}
	pdir, name := parentName(path)
	pfd, err = openBeneath(upperRoot, pdir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return -1, "", pst, fmt.Errorf("open upper parent: %w", err)
	}
	if err := unix.Fstat(pfd, &pst); err != nil {
		closeFD(pfd)
		return -1, "", pst, err
	}
	return pfd, name, pst, nil
}
