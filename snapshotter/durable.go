package snapshotter

import (
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// syncPrepared and syncPlaced make a new snapshot's directory durable
// before the transaction that names it commits. bolt's fdatasync of its own
// file does not order the rename of another directory on disk (on xfs an
// overwrite of the preallocated db forces no log at all), so a power cut
// right after a Prepare returned would leave metadata naming a directory
// that is gone, and the snapshot unusable. It is measured on a shut-down
// xfs in test/durability. Both are skipped with sync_on_commit off, which
// accepts losses.
//
// syncPrepared runs before the write transaction, so no other call waits
// for it: the directory's contents and the directory itself. In userspace
// mode the contents are a copy of the parent which, without a reflink
// (ext4), is fresh data in the page cache: a power cut would hand the
// container files of the right size full of zeros (also measured), so the
// whole filesystem is synced. syncPlaced runs inside the transaction,
// after the rename: only snapshots/, whose entry the rename changed.
// Each directory is fsynced on its own because btrfs logs per inode, where
// xfs and ext4 force the whole log on the first.
func (s *Snapshotter) syncPrepared(td string) error {
	if !s.syncs {
		return nil
	}
	if s.mode == ModeUserspace {
		return syncFilesystem(td)
	}
	for _, dir := range []string{filepath.Join(td, "fs"), td} {
		if err := fsyncDir(dir); err != nil {
			return err
		}
	}
	return nil
}

func (s *Snapshotter) syncPlaced() error {
	if !s.syncs {
		return nil
	}
	return fsyncDir(filepath.Join(s.root, snapshotsDir))
}

func fsyncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s to sync: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
