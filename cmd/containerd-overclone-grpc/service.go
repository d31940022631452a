package main

import (
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs/pkg/errgrpc"
)

// service is containerd's snapshotservice with one fix: its List returns
// the snapshotter's error unconverted, so a bad filter (InvalidArgument)
// would reach the client as Unknown. Every other method already converts.
type service struct {
	snapshotsapi.SnapshotsServer
}

func newService(sn snapshots.Snapshotter) service {
	return service{snapshotservice.FromSnapshotter(sn)}
}

func (s service) List(req *snapshotsapi.ListSnapshotsRequest, stream snapshotsapi.Snapshots_ListServer) error {
	return errgrpc.ToGRPC(s.SnapshotsServer.List(req, stream))
}
