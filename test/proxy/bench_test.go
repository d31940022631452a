package proxy

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/builtin"
	"github.com/overclone/overclone/test/daemon"
)

// BenchmarkCalls measures each snapshotter call in one run: overclone and
// containerd's built-in overlayfs in-process; each served by the same gRPC
// server from this process over a unix socket (like with like); and
// overclone as the real daemon in its own process. Each side runs as it
// ships: overclone with the daemon's defaults (sync_on_commit on; the
// -nosync target has it off, to show the sync's cost), the built-in with
// containerd's plugin defaults (asynchronous remove). As that built-in
// deletes nothing in Remove, RemoveCleanup times a Remove followed by the
// Cleanup containerd's GC calls after it, where the built-in pays. Compare
// the ratios, never the absolute times: this machine is shared.
//
//	go test -run '^$' -bench BenchmarkCalls -count 5 ./test/proxy/ | benchstat
func BenchmarkCalls(b *testing.B) {
	ctx := namespaces.WithNamespace(context.Background(), "bench")
	targets := benchTargets(ctx, b)
	// Setting up (kernel probes, a daemon's start) leaves writes behind;
	// flush them so the first target measured does not pay for them, and
	// start each round with the next target, so none is always first.
	unix.Sync()
	round++
	for i := range targets {
		target := targets[(i+round)%len(targets)]
		base := fmt.Sprintf("base-%s", target.name)
		prepareCommitted(ctx, b, target.sn, base)

		b.Run("Prepare/"+target.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := target.sn.Prepare(ctx, uniqueKey("p"), base); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("View/"+target.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := target.sn.View(ctx, uniqueKey("v"), base); err != nil {
					b.Fatal(err)
				}
			}
		})
		container := uniqueKey("container")
		if _, err := target.sn.Prepare(ctx, container, base); err != nil {
			b.Fatal(err)
		}
		b.Run("Mounts/"+target.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := target.sn.Mounts(ctx, container); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("Stat/"+target.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := target.sn.Stat(ctx, base); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("Commit/"+target.name, func(b *testing.B) {
			keys := prepareMany(ctx, b, target.sn, "c", base, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := target.sn.Commit(ctx, keys[i]+"-done", keys[i]); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("Remove/"+target.name, func(b *testing.B) {
			keys := prepareMany(ctx, b, target.sn, "r", base, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := target.sn.Remove(ctx, keys[i]); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("RemoveCleanup/"+target.name, func(b *testing.B) {
			keys := prepareMany(ctx, b, target.sn, "rc", base, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := target.sn.Remove(ctx, keys[i]); err != nil {
					b.Fatal(err)
				}
				if err := target.sn.(snapshots.Cleaner).Cleanup(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// round counts the benchmark's rounds (-count), to rotate the order.
var round int

type benchTarget struct {
	name string
	sn   snapshots.Snapshotter
}

func benchTargets(ctx context.Context, b *testing.B) []benchTarget {
	// What the daemon passes with no config file; the mode is left to
	// auto, as the daemon does.
	shipped := snapshotter.WithSyncOnCommit(config.Default().SyncOnCommit)
	open := func(opts ...snapshotter.Opt) *snapshotter.Snapshotter {
		s, err := snapshotter.New(ctx, b.TempDir(), append([]snapshotter.Opt{shipped}, opts...)...)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { s.Close() })
		return s
	}
	openBuiltin := func() snapshots.Snapshotter {
		s, err := builtin.Overlay(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { s.Close() })
		return s
	}
	// The daemon as it ships: no config, so sync_on_commit on, and its
	// default log level. Its like is the built-in in a process of its own.
	d := daemon.StartLogging(b, b.TempDir(), "", "")
	bp := builtin.Start(b, b.TempDir())
	return []benchTarget{
		{"overclone-inproc", open()},
		{"overclone-nosync-inproc", open(snapshotter.WithSyncOnCommit(false))},
		{"builtin-inproc", openBuiltin()},
		{"overclone-grpc", serveInProcess(b, open())},
		{"builtin-grpc", serveInProcess(b, openBuiltin())},
		{"overclone-daemon", d.Client()},
		{"builtin-daemon", dial(b, bp.Address)},
	}
}

// serveInProcess serves sn on a unix socket from this process and returns
// containerd's proxy client for it.
func serveInProcess(b *testing.B, sn snapshots.Snapshotter) snapshots.Snapshotter {
	sock := filepath.Join(b.TempDir(), "builtin.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotter.NewService(sn))
	go srv.Serve(l)
	b.Cleanup(srv.Stop)
	return dial(b, sock)
}

// dial returns containerd's proxy client for the snapshotter served on sock.
func dial(b *testing.B, sock string) snapshots.Snapshotter {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "snapshotter")
}

func prepareCommitted(ctx context.Context, b *testing.B, sn snapshots.Snapshotter, name string) {
	if _, err := sn.Prepare(ctx, name+"-active", ""); err != nil {
		b.Fatal(err)
	}
	if err := sn.Commit(ctx, name, name+"-active"); err != nil {
		b.Fatal(err)
	}
}

var keySeq int

// uniqueKey names a snapshot no earlier round of the benchmark used.
func uniqueKey(prefix string) string {
	keySeq++
	return fmt.Sprintf("%s-%d", prefix, keySeq)
}

func prepareMany(ctx context.Context, b *testing.B, sn snapshots.Snapshotter, prefix, parent string, n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = uniqueKey(prefix)
		if _, err := sn.Prepare(ctx, keys[i], parent); err != nil {
			b.Fatal(err)
		}
	}
	return keys
}
