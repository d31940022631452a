package main

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/daemon"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/snapshotter/metrics"
)

// maxRecvMsgSize is the largest request taken. No snapshotter request
// needs more than a key, a parent and labels: containerd limits a label to
// 4 KiB and sends a few; gRPC's own default of 4 MiB is kept, named here so
// that it is a decision.
const maxRecvMsgSize = 4 << 20

// serve runs the gRPC server until SIGTERM or SIGINT. The first signal stops
// taking new calls and waits (up to the configured timeout) for calls in
// flight; a second signal, or the timeout, cuts them off. The snapshotter
// is closed last, so bolt is never closed under a running call.
func serve(ctx context.Context, cfg config.Config, sn *snapshotter.Snapshotter) (err error) {
	defer func() {
		if cerr := sn.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()

	l, err := listen(ctx, cfg.Address)
	if err != nil {
		return err
	}

	measured := metrics.Wrap(sn)
	sn.OnFlatten(metrics.FlattenedLayerBuilt)
	sn.OnCopy(metrics.Copied)
	if cfg.MetricsAddress != "" {
		stop, err := serveMetrics(ctx, cfg.MetricsAddress, sn)
		if err != nil {
			return err
		}
		defer stop()
	}
	if cfg.DebugAddress != "" {
		stop, err := serveDebug(ctx, cfg.DebugAddress)
		if err != nil {
			return err
		}
		defer stop()
	}

	// A message over the limit is refused by gRPC with ResourceExhausted
	// before it reaches the snapshotter, so nothing changes.
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(maxRecvMsgSize))
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotter.NewService(measured))
	snapshotter.RegisterAdmin(srv, sn)
	// The standard health service lets a DaemonSet probe or
	// grpc-health-probe ask the socket itself whether overclone serves.
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, checkedHealth{Server: hs, sn: sn})

	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(signals)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()

	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.G(ctx).WithError(err).Warn("failed to notify systemd of readiness")
	}
	log.G(ctx).WithField("address", cfg.Address).WithField("root", cfg.Root).Info("serving snapshots API")

	select {
	case err := <-served:
		if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return err
		}
		return nil
	case sig := <-signals:
		log.G(ctx).WithField("signal", sig).Info("stopping: finishing calls in flight")
	}
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	hs.Shutdown()

	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	timeout := time.NewTimer(time.Duration(cfg.ShutdownTimeout))
	defer timeout.Stop()
	select {
	case <-stopped:
	case sig := <-signals:
		log.G(ctx).WithField("signal", sig).Warn("second signal: stopping now")
		srv.Stop()
	case <-timeout.C:
		log.G(ctx).WithField("timeout", cfg.ShutdownTimeout).Warn("calls still in flight at the shutdown timeout: stopping now")
		srv.Stop()
	}
	<-stopped
	log.G(ctx).Info("stopped")
	return nil
}
