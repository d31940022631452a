package snapshotter

import (
	"context"
	"os"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/overclone/overclone/test/loopfs"
)

// TestSnapshotterSuite runs containerd's own snapshotter suite, all of it,
// under overclone's name (so its Rename case renames a lower directory, which
// the built-in overlayfs snapshotter is excused from), on each backing
// filesystem.
func TestSnapshotterSuite(t *testing.T) {
	for _, kind := range []loopfs.Kind{loopfs.Ext4, loopfs.XFS} {
		t.Run(string(kind), func(t *testing.T) {
			base := loopfs.Mount(t, kind)
			testsuite.SnapshotterSuite(t, "overclone", func(ctx context.Context, _ string) (snapshots.Snapshotter, func() error, error) {
				root, err := os.MkdirTemp(base, "root-")
				if err != nil {
					return nil, nil, err
				}
				s, err := New(ctx, root)
				if err != nil {
					return nil, nil, err
				}
				return s, s.Close, nil
			})
		})
	}
}
