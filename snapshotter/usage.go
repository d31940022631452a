package snapshotter

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	cfs "github.com/containerd/continuity/fs"

	"github.com/overclone/overclone/fileops"
)

// usage is what a snapshot's directory takes on disk.
//
// In overlay mode a layer holds only its own changes, so continuity's
// DiskUsage (blocks of every inode, hard links once) is the answer.
//
// In userspace mode a snapshot holds its whole view, most of it reflinked
// from its parent: counting every block would count the image once per
// container. There a file's data counts only where its extents are not
// shared (FIEMAP without FIEMAP_EXTENT_SHARED): what writing to it made its
// own. Shared extents are counted by the snapshot that wrote them first, at
// its Commit. Directories, symlinks and other inodes count in full: each
// snapshot has its own. On a filesystem that cannot share extents nothing is
// shared, and the figure is the full copy the snapshot really is.
//
// CRI asks for the usage of every container every 10 s, and a FIEMAP per
// file of an image is slow (a 10k-file image: half a second). A file whose
// inode has not changed since the snapshot was made (ctime before created)
// is still what materialize left, and where materialize reflinked every
// file that is its parent's extents, all shared: it counts nothing without
// asking. Where materialize had to copy some data (a filesystem without
// reflink, or one that refused a clone: btrfs between a NOCOW and a COW
// file), the snapshot's directory carries a marker and every file is asked.
// On a filesystem that cannot share extents at all, nothing is shared and
// the blocks are counted as they are, with no FIEMAP. (btrfs keeps very
// small files inline in its metadata, unshared; those few bytes are not
// counted.)
//
// snapDir is the snapshot's directory (snapshots/<id>), upper its fs dir.
func (s *Snapshotter) usage(ctx context.Context, snapDir, upper string, created time.Time) (snapshots.Usage, error) {
	if s.mode != ModeUserspace || !canShare(upper) {
		du, err := cfs.DiskUsage(ctx, upper)
		if err != nil {
			return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", upper, err)
		}
		return snapshots.Usage(du), nil
	}
	untouchedBefore := created
	if _, err := os.Lstat(filepath.Join(snapDir, copiedMarker)); err == nil {
		untouchedBefore = time.Time{}
	}
	return exclusiveUsage(ctx, upper, untouchedBefore)
}

// canShare tells whether the filesystem holding dir can share extents; if
// the probe fails, FIEMAP will say per file.
func canShare(dir string) bool {
	caps, err := fileops.ProbeCaps(dir)
	return err != nil || caps.Reflink == fileops.Yes
}

// copiedMarker, in a userspace snapshot's directory, says that
// materialize copied data rather than sharing it: its untouched files are
// not all shared with the parent.
const copiedMarker = "copied"

// exclusiveUsage counts what dir does not share; regular files whose ctime
// is before untouchedBefore are taken as wholly shared.
func exclusiveUsage(ctx context.Context, dir string, untouchedBefore time.Time) (snapshots.Usage, error) {
	var u snapshots.Usage
	err := walkInodes(ctx, dir, func(path string, d fs.DirEntry, st *syscall.Stat_t) error {
		u.Inodes++
		if !d.Type().IsRegular() {
			u.Size += st.Blocks * 512
			return nil
		}
		if time.Unix(st.Ctim.Unix()).Before(untouchedBefore) {
			return nil
		}
		own, err := unsharedBytes(path)
		if err != nil {
			return err
		}
		u.Size += own
		return nil
	})
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", dir, err)
	}
	return u, nil
}

// walkInodes calls fn once for each inode under dir (a hard link's other
// names are skipped), stopping when ctx is done.
func walkInodes(ctx context.Context, dir string, fn func(path string, d fs.DirEntry, st *syscall.Stat_t) error) error {
	type inode struct{ dev, ino uint64 }
	seen := map[inode]struct{}{}
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		key := inode{uint64(st.Dev), st.Ino}
		if _, ok := seen[key]; ok {
			return nil
		}
		seen[key] = struct{}{}
		return fn(path, d, st)
	})
}

// FIEMAP, from linux/fiemap.h and linux/fs.h; x/sys/unix has neither.
const (
	fiemapExtentLast   = 0x1
	fiemapExtentShared = 0x2000
	fiemapFlagSync     = 0x1
	fiemapBatch        = 64
	fsIocFiemap        = 0xc020660b // _IOWR('f', 11, struct fiemap)
)

type fiemapExtent struct {
	Logical, Physical, Length uint64
	_                         [2]uint64
	Flags                     uint32
	_                         [3]uint32
}

type fiemap struct {
	Start, Length                        uint64
	Flags, MappedExtents, ExtentCount, _ uint32
	Extents                              [fiemapBatch]fiemapExtent
}

// unsharedBytes sums the extents of path that no other file shares.
func unsharedBytes(path string) (int64, error) {
	_, own, err := fileExtents(path)
	return own, err
}
