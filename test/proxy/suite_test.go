// Package proxy tests overclone the way containerd reaches it: the real
// daemon binary, containerd's proxy snapshotter client, a real unix socket.
package proxy

import (
	"context"
	"os"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
)

// TestSnapshotterSuiteThroughProxy runs containerd's snapshotter suite
// against the daemon, through the gRPC hop, on ext4 and xfs.
func TestSnapshotterSuiteThroughProxy(t *testing.T) {
	for _, kind := range []loopfs.Kind{loopfs.Ext4, loopfs.XFS} {
		t.Run(string(kind), func(t *testing.T) {
			base := loopfs.Mount(t, kind)
			testsuite.SnapshotterSuite(t, "overclone", func(ctx context.Context, _ string) (snapshots.Snapshotter, func() error, error) {
				root, err := os.MkdirTemp(base, "root-")
				if err != nil {
					return nil, nil, err
				}
				d := daemon.Start(t, root, "")
				return d.Client(), d.Stop, nil
			})
		})
	}
}
