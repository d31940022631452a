package snapshotter

import (
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// syncPlaced makes a new snapshot's directory durable before the
// transaction that names it commits. bolt's fdatasync of its own file does
// not order the rename of another directory on disk (on xfs an overwrite
// of the preallocated db forces no log at all), so a power cut right after
// a Prepare returned would leave metadata naming a directory that is gone,
// and the snapshot unusable. It is measured on a shut-down xfs in
// test/durability. Skipped with sync_on_commit off, which accepts losses.
//
// The fs dir, the snapshot's dir and snapshots/ are each fsynced: on xfs
// and ext4 the first fsync forces the whole log and the others cost
// nothing, but btrfs logs per inode.
func (s *Snapshotter) syncPlaced(id string) error {
	if !s.syncs {
		return nil
	}
	for _, dir := range []string{s.upperPath(id), s.snapshotDir(id), filepath.Join(s.root, snapshotsDir)} {
		if err := fsyncDir(dir); err != nil {
			return err
		}
	}
	return nil
}

// syncMaterialized makes a userspace-mode copy of a parent durable before
// its metadata commits. Without a reflink (ext4) the copy is fresh data in
// the page cache: a power cut after Prepare returned would hand the
// container files of the right size full of zeros, measured on a shut-down
// ext4 in test/durability. It runs before the write transaction, so no
// other call waits for it.
func (s *Snapshotter) syncMaterialized(dir string) error {
	if !s.syncs {
		return nil
	}
	return syncFilesystem(dir)
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
