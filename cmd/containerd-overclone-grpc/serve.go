package main

import (
	"context"
	"errors"
	"fmt"
	"io"
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
	"github.com/overclone/overclone/differ"
	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/snapshotter/metrics"
)

// maxRecvMsgSize is the largest request taken. No snapshotter request
// needs more than a key, a parent and labels: containerd limits a label to
// 4 KiB and sends a few; gRPC's own default of 4 MiB is kept, named here so
// that it is a decision.
const maxRecvMsgSize = 4 << 20

// stopGrace is how long calls cut off at the shutdown timeout or by a
// second signal get to return once their contexts and the shared work
// they wait on are cancelled: long enough for a flattening to notice
// between two files, short enough that a second signal still means now.
const stopGrace = 500 * time.Millisecond

// closeTimeout bounds closing the snapshotter at exit. bolt's Close waits
// for every open transaction, and a call that never returns (a write on a
// hung disk) would hold one forever; exiting without closing is safe, as
// bolt keeps only committed transactions and a restart recovers the rest.
const closeTimeout = time.Second

// serve runs the gRPC server until SIGTERM or SIGINT. The first signal stops
// taking new calls and waits (up to the configured timeout) for calls in
// flight; a second signal, or the timeout, cuts them off, and serve then
// returns within stopGrace+closeTimeout whatever the calls do. The
// snapshotter is closed last, so bolt is closed under a running call only
// if one outlives the stop.
func serve(ctx context.Context, cfg config.Config, sn *snapshotter.Snapshotter) (err error) {
	defer func() {
		if cerr := closeWithin(sn, closeTimeout); cerr != nil && err == nil {
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
	if cfg.DiffService {
		// containerd's diff service calls it as a proxy diff plugin; it
		// dials containerd only on the first Compare it serves.
		rd, err := differ.NewRemote(cfg.Root, cfg.ContainerdAddress)
		if err != nil {
			return err
		}
		defer rd.Close()
		rd.Register(srv)
	}
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
	log.G(ctx).WithField("address", cfg.Address).WithField("root", cfg.Root).WithField("diff_service", cfg.DiffService).Info("serving snapshots API")

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
	stopServing(ctx, srv, sn.Abort, signals, time.Duration(cfg.ShutdownTimeout))
	log.G(ctx).Info("stopped")
	return nil
}

// stopServing stops srv: it waits for the calls in flight up to timeout or
// until a signal, then cuts them off, calls abort, and gives them
// stopGrace to return before it returns without them.
func stopServing(ctx context.Context, srv *grpc.Server, abort func(), signals <-chan os.Signal, timeout time.Duration) {
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-stopped:
		return
	case sig := <-signals:
		log.G(ctx).WithField("signal", sig).Warn("second signal: stopping now")
	case <-timer.C:
		log.G(ctx).WithField("timeout", timeout).Warn("calls still in flight at the shutdown timeout: stopping now")
	}
	// A flattened layer's build serves every caller waiting on it and no
	// call's context ends it: abort does, first. Stop cancels every call's
	// context and closes the connections, but GracefulStop, still running,
	// waits for the handlers to return; and Stop, racing a GracefulStop
	// that has just begun (a second signal at once), can itself wait for
	// a handler (TestStopServingBoundedByStuckCall catches it). Neither is
	// waited for past stopGrace.
	abort()
	go srv.Stop()
	select {
	case <-stopped:
	case <-time.After(stopGrace):
		log.G(ctx).WithField("grace", stopGrace).Warn("calls still running after the stop: exiting without them")
	}
}

// closeWithin closes sn (the snapshotter) unless that takes longer than timeout, when it
// gives up with an error and leaves the close running.
func closeWithin(sn io.Closer, timeout time.Duration) error {
	closed := make(chan error, 1)
	go func() { closed <- sn.Close() }()
	select {
	case err := <-closed:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("close the snapshotter: still waiting after %s for a call that holds the metadata; exiting with only committed changes kept", timeout)
	}
}
