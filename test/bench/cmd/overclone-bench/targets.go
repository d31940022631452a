package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/builtin"
	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
)

// Target names. Ratios are taken against the built-in overlayfs
// snapshotter on the same side of the gRPC hop. Both sides run as they
// ship: overclone with the daemon's defaults (sync_on_commit on), the
// built-in with containerd's plugin defaults (asynchronous remove).
const (
	tOverclone = "overclone"        // in-process, the daemon's defaults: overlay mode here, sync on Commit
	tNoSync    = "overclone-nosync" // the same with sync_on_commit = false, to show what the sync costs
	tUserspace = "overclone-us"     // userspace mode, otherwise the daemon's defaults
	tOverlay   = "overlay"          // containerd's built-in overlayfs, its plugin's defaults
	tNative    = "native"           // containerd's built-in native
	tFileops   = "fileops"          // overclone's copy-up engine, no mount
	tOCGRPC    = "overclone-grpc"   // in-process gRPC server, unix socket
	tOvGRPC    = "overlay-grpc"     // the built-in behind the same server
	tDaemon    = "overclone-daemon" // the real daemon binary
	tOvProc    = "overlay-proc"     // the built-in served from a process of its own
	tOverlay2  = "overlay-again"    // a second built-in: the A/A noise floor
)

func baselineOf(name string) string {
	switch name {
	case tOverlay, tOvGRPC:
		return ""
	case tOCGRPC:
		return tOvGRPC
	case tDaemon:
		return tOvProc
	case tOvProc:
		return tOvGRPC
	}
	return tOverlay
}

// target is one snapshotter under test, with its own root on the
// filesystem being measured.
type target struct {
	name     string
	baseline string
	sn       snapshots.Snapshotter
	ours     *snapshotter.Snapshotter // set for in-process overclone
	root     string
	close    func()
}

// env is one loop-mounted filesystem and what runs on it.
type env struct {
	ctx  context.Context
	kind loopfs.Kind
	dir  string // the loop mount
	tb   *runTB
	rep  *Report
	p    params
	img  *image
	// noted remembers what was already written into the notes.
	noted map[string]bool
}

func (e *env) fs() string { return string(e.kind) }

// open makes fresh snapshotters for one workload, each in its own root
// under the loop mount, so that no workload sees another's snapshots.
func (e *env) open(workload string, names ...string) ([]*target, error) {
	var ts []*target
	for _, name := range names {
		t, err := e.openOne(workload, name)
		if err != nil {
			closeAll(ts)
			return nil, fmt.Errorf("open %s: %w", name, err)
		}
		ts = append(ts, t)
	}
	return ts, nil
}

func (e *env) openOne(workload, name string) (*target, error) {
	root := filepath.Join(e.dir, workload, name)
	if err := os.MkdirAll(filepath.Dir(root), 0o700); err != nil {
		return nil, err
	}
	t := &target{name: name, baseline: baselineOf(name), root: root}
	cleanup := func() { os.RemoveAll(root) }
	// shipped is what the daemon passes with no config file; the bench
	// pins the mode (auto picks overlay on this kernel) so that a probe
	// cannot change what is measured.
	shipped := config.Default()
	ours := func(opts ...snapshotter.Opt) (*snapshotter.Snapshotter, error) {
		opts = append([]snapshotter.Opt{
			snapshotter.WithMode(snapshotter.ModeOverlay),
			snapshotter.WithSyncOnCommit(shipped.SyncOnCommit),
		}, opts...)
		return snapshotter.New(e.ctx, root, opts...)
	}
	switch name {
	case tOverclone, tFileops:
		sn, err := ours()
		if err != nil {
			return nil, err
		}
		t.sn, t.ours = sn, sn
	case tNoSync:
		sn, err := ours(snapshotter.WithSyncOnCommit(false))
		if err != nil {
			return nil, err
		}
		t.sn, t.ours = sn, sn
	case tUserspace:
		sn, err := ours(snapshotter.WithMode(snapshotter.ModeUserspace))
		if err != nil {
			return nil, err
		}
		t.sn, t.ours = sn, sn
	case tOverlay, tOverlay2:
		sn, err := builtin.Overlay(root)
		if err != nil {
			return nil, err
		}
		t.sn = sn
	case tNative:
		sn, err := native.NewSnapshotter(root)
		if err != nil {
			return nil, err
		}
		t.sn = sn
	case tOCGRPC, tOvGRPC:
		var inner snapshots.Snapshotter
		var err error
		if name == tOCGRPC {
			inner, err = ours()
		} else {
			inner, err = builtin.Overlay(root)
		}
		if err != nil {
			return nil, err
		}
		client, stop, err := serve(e.tb.TempDir(), inner)
		if err != nil {
			inner.Close()
			return nil, err
		}
		t.sn = client
		t.close = func() { stop(); inner.Close(); cleanup() }
		return t, nil
	case tOvProc:
		client, stop, err := startBuiltinProc(root, e.tb.TempDir())
		if err != nil {
			return nil, err
		}
		t.sn = client
		t.close = func() { stop(); cleanup() }
		return t, nil
	case tDaemon:
		// The daemon as it ships: no config, so sync_on_commit on.
		d := daemon.Start(e.tb, root, "")
		// test/daemon starts it at debug level, which logs every call;
		// measure it as deployed, at the default level.
		if err := quietDaemon(d); err != nil {
			return nil, err
		}
		t.sn = d.Client()
		t.close = func() { d.Stop(); cleanup() }
		return t, nil
	default:
		return nil, fmt.Errorf("unknown target %q", name)
	}
	t.close = func() { t.sn.Close(); cleanup() }
	return t, nil
}

func closeAll(ts []*target) {
	for _, t := range ts {
		t.close()
	}
}

// serve serves sn with overclone's gRPC service on a unix socket in dir
// and returns containerd's proxy client for it: the hop a proxy plugin
// costs, with the same server code on both sides of the comparison.
func serve(dir string, sn snapshots.Snapshotter) (snapshots.Snapshotter, func(), error) {
	sock := filepath.Join(dir, "sn.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		return nil, nil, err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotter.NewService(sn))
	go srv.Serve(l)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		srv.Stop()
		return nil, nil, err
	}
	stop := func() { conn.Close(); srv.Stop() }
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "bench"), stop, nil
}

// rotate returns ts in the order round r runs them: each target goes
// first in turn, so no target always runs right after the same neighbour
// (and its writeback).
func rotate[T any](ts []T, r int) []T {
	out := make([]T, 0, len(ts))
	for i := range ts {
		out = append(out, ts[(i+r)%len(ts)])
	}
	return out
}

func quietDaemon(d *daemon.Daemon) error {
	for i, a := range d.Args {
		if a == "--log-level" && i+1 < len(d.Args) {
			d.Args[i+1] = "info"
		}
	}
	if err := d.Stop(); err != nil {
		return err
	}
	return d.Restart()
}
