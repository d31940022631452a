package main

import (
	"context"

	"github.com/containerd/log"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/overclone/overclone/snapshotter"
)

// checkedHealth is gRPC's health service with the snapshotter's own check
// behind Check: grpc-health-probe in a DaemonSet then sees a root that
// went read-only or a closed database as NOT_SERVING, as /healthz does,
// rather than a process that merely answers. Watch keeps the plain
// service's status (serving until shutdown).
type checkedHealth struct {
	*health.Server
	sn *snapshotter.Snapshotter
}

func (h checkedHealth) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	resp, err := h.Server.Check(ctx, req)
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		return resp, err
	}
	ctx, cancel := context.WithTimeout(ctx, healthCheckTimeout)
	defer cancel()
	if err := h.sn.Check(ctx); err != nil {
		log.G(ctx).WithError(err).Warn("health check failed")
		return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING}, nil
	}
	return resp, nil
}
