package snapshotter

import (
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs/pkg/errgrpc"
)

// NewService serves sn over containerd's snapshots gRPC API. It is
// containerd's snapshotservice with one fix: its List returns the
// snapshotter's error unconverted, so a bad filter (InvalidArgument) would
// reach the client as Unknown. Every other method already converts.
func NewService(sn snapshots.Snapshotter) snapshotsapi.SnapshotsServer {
	return service{snapshotservice.FromSnapshotter(sn)}
}

type service struct {
	snapshotsapi.SnapshotsServer
}

func (s service) List(req *snapshotsapi.ListSnapshotsRequest, stream snapshotsapi.Snapshots_ListServer) error {
	return errgrpc.ToGRPC(s.SnapshotsServer.List(req, stream))
}
