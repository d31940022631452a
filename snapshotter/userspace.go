package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"

	"github.com/overclone/overclone/fileops"
)

// In userspace mode a snapshot's fs dir is its whole view, as with
// containerd's native snapshotter, but a new active snapshot is made from
// its parent by fileops, which reflinks file data where the filesystem can:
// a Prepare costs metadata, not a copy of the image.

// parentID returns the id of the committed snapshot parent, or "" when
// there is none (the write transaction will then say why, with the right
// error class).
func (s *Snapshotter) parentID(ctx context.Context, parent string) string {
	var id string
	s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		pid, info, _, err := storage.GetInfo(ctx, parent)
		if err == nil && info.Kind == snapshots.KindCommitted {
			id = pid
		}
		return nil
	})
	return id
}

// materialize writes the view of committed snapshot parentID into td/fs,
// with the owners shifted by m when it is not nil (a user-namespaced
// container's). If any data was copied rather than reflinked it leaves
// td/copied, which tells usage that the snapshot's untouched files may
// hold blocks of their own.
func (s *Snapshotter) materialize(ctx context.Context, parentID, td string, m *idMapping) error {
	dst := filepath.Join(td, "fs")
	stack, err := fileops.NewStack("", []string{s.upperPath(parentID)}, fileops.WithVerbatim())
	if err != nil {
		return fmt.Errorf("materialize snapshot %s: %w", parentID, err)
	}
	stats, err := fileops.Flatten(ctx, stack, dst, m.flattenOpts()...)
	if err != nil {
		return fmt.Errorf("materialize snapshot %s: %w", parentID, err)
	}
	s.countCopied("materialize", stats)
	if stats.CopyFileRanged > 0 || stats.ReadWritten > 0 {
		if err := os.WriteFile(filepath.Join(td, copiedMarker), nil, 0o600); err != nil {
			return fmt.Errorf("materialize snapshot %s: %w", parentID, err)
		}
	}
	return nil
}
