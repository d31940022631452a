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
// the built-in overlayfs snapshotter is excused from), in both modes, on a
// filesystem that reflinks (xfs) and one that does not (ext4).
func TestSnapshotterSuite(t *testing.T) {
	for _, mode := range []Mode{ModeOverlay, ModeUserspace} {
		for _, kind := range []loopfs.Kind{loopfs.Ext4, loopfs.XFS} {
			t.Run(string(mode)+"/"+string(kind), func(t *testing.T) {
				suite(t, kind, WithMode(mode))
			})
		}
	}
}

func suite(t *testing.T, kind loopfs.Kind, opts ...Opt) {
	base := loopfs.Mount(t, kind)
	testsuite.SnapshotterSuite(t, "overclone", func(ctx context.Context, _ string) (snapshots.Snapshotter, func() error, error) {
		root, err := os.MkdirTemp(base, "root-")
		if err != nil {
			return nil, nil, err
		}
		s, err := New(ctx, root, opts...)
		if err != nil {
			return nil, nil, err
		}
		return s, s.Close, nil
	})
}
