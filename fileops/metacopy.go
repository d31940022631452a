package fileops

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"
)

// openData opens the file holding an entry's data: the entry itself, or
// for a metacopy file the lower file below it.
func (v *view) openData(e Entry) (int, error) {
	root, err := v.root(e.DataLayer)
	if err != nil {
		return -1, err
	}
	dir, name := parentName(e.DataPath)
	pfd, err := openBeneath(root, dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return -1, err
	}
	defer closeFD(pfd)
	return openSource(pfd, name)
}

// copyUpData completes a metacopy file the kernel left in the upper: its
// data is copied in from below and the metacopy mark removed, the way
// overlayfs does on the first open for write. The data lands in a
// temporary file that is renamed over the metacopy file, so a crash leaves
// either the old metacopy file or the complete one.
func (v *view) copyUpData(ctx context.Context, e Entry) (res CopyResult, err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("copy up data of %s from layer %s: %w", e.Path, v.s.layers[e.DataLayer], err)
		}
	}()
	pfd, name, pst, err := v.openUpperParent(e.Path)
	if err != nil {
		return res, err
	}
	defer closeFD(pfd)
	xs, err := v.s.srcXattrs(procPath(pfd, name))
	if err != nil {
		return res, err
	}
	sfd, err := v.openData(e)
	if err != nil {
		return res, err
	}
	defer closeFD(sfd)
	dfd, err := unix.Openat(pfd, ".", unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return res, err
	}
	defer closeFD(dfd)
	m, n, err := copyData(ctx, dfd, sfd, e.Stat.Size, v.s.cfg.methods)
	if err != nil {
		return res, err
	}
	if !v.s.cfg.volatile {
		if err := unix.Fsync(dfd); err != nil {
			return res, err
		}
	}
	if err := applyMeta(dfd, &e.Stat, xs, false); err != nil {
		return res, err
	}
	tmp := newStagingName()
	defer releaseStagingName(tmp)
	if err := unix.Linkat(unix.AT_FDCWD, fdPath(dfd), pfd, tmp, unix.AT_SYMLINK_FOLLOW); err != nil {
		return res, err
	}
	// The staging name is in the upper, where a running container can
	// swap it: only the file written here may replace the metacopy file.
	if err := checkEntry(pfd, tmp, dfd); err != nil {
		return res, fmt.Errorf("staged file %w", err)
	}
	if err := unix.Renameat(pfd, tmp, pfd, name); err != nil {
		removeStaged(pfd, tmp, dfd)
		return res, err
	}
	if err := setTimes(dfd, &e.Stat); err != nil {
		return res, err
	}
	return CopyResult{Method: m, Bytes: n}, setTimes(pfd, &pst)
}
