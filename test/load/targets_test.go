package load

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/overclone/overclone/test/builtin"
	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
)

// Target names, as the report prints them.
const (
	overclone = "overclone"
	builtIn   = "built-in"
)

// target is one snapshotter server the clients connect to: overclone's
// daemon or containerd's built-in, each in a process of its own with a
// root on a loop xfs of its own.
type target struct {
	name    string
	address string
	dump    func() // the server's goroutines to its log, for a deadlock
	log     func() string
}

// startOverclone runs the daemon with the shipped defaults (config from
// OVERCLONE_LOAD_CONFIG, empty by default: sync on Commit).
func startOverclone(t *testing.T) (*target, *daemon.Daemon) {
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	d := daemon.Start(t, root, os.Getenv("OVERCLONE_LOAD_CONFIG"))
	return &target{
		name:    overclone,
		address: d.Address,
		dump:    func() { d.Signal(syscall.SIGQUIT) },
		log:     d.Log,
	}, d
}

// startBuiltin serves containerd's overlayfs snapshotter as containerd
// ships it, on a loop xfs like the daemon's.
func startBuiltin(t *testing.T) (*target, *builtin.Server) {
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	s := builtin.Start(t, root)
	return &target{
		name:    builtIn,
		address: s.Address,
		dump:    func() { s.Signal(syscall.SIGQUIT) },
		log:     s.Log,
	}, s
}

// connect dials the target on a connection of its own, as each of
// containerd's clients would be, and makes one call so that setting up
// the connection is not counted as the first call's latency.
func connect(t *testing.T, ctx context.Context, tg *target) (snapshots.Snapshotter, *grpc.ClientConn) {
	conn, err := grpc.NewClient("unix://"+tg.address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), tg.name)
	if _, err := sn.Stat(ctx, "shared/base"); err != nil {
		conn.Close()
		t.Fatalf("%s: %v", tg.name, err)
	}
	return sn, conn
}

// makeShared makes the parents every client uses: a base and a layer on it.
func makeShared(t *testing.T, ctx context.Context, tg *target) {
	conn, err := grpc.NewClient("unix://"+tg.address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), tg.name)
	for _, step := range []func() error{
		func() error { _, err := sn.Prepare(ctx, "shared/base-a", ""); return err },
		func() error { return sn.Commit(ctx, "shared/base", "shared/base-a") },
		func() error { _, err := sn.Prepare(ctx, "shared/mid-a", "shared/base"); return err },
		func() error { return sn.Commit(ctx, "shared/mid", "shared/mid-a") },
	} {
		if err := step(); err != nil {
			t.Fatalf("%s: %v", tg.name, err)
		}
	}
}

// phase is one workload run against one target: n clients, each calling
// work in a loop until the run is over.
type phase struct {
	name    string
	clients int
	run     time.Duration
	seed    uint64
	work    func(*client, context.Context)
	// prefix starts every key the clients make, so that no run meets
	// the snapshots an earlier one left behind.
	prefix string
}

// runPhase runs p against tg and returns what the clients saw. The
// clients connect before the clock starts. A run in which no call
// finishes for stallTimeout is a deadlock: the server's goroutines go to
// its log and the test fails with it.
func runPhase(t *testing.T, ctx context.Context, tg *target, p phase) *stats {
	st := newStats()
	var progress atomic.Int64
	cs := make([]*client, p.clients)
	for i := range cs {
		sn, conn := connect(t, ctx, tg)
		defer conn.Close()
		cs[i] = &client{
			id:       i,
			prefix:   p.prefix,
			sn:       sn,
			rng:      rand.New(rand.NewPCG(p.seed, uint64(i))),
			stats:    st,
			progress: &progress,
		}
	}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()

	stalled := make(chan struct{})
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		last, lastChange := progress.Load(), time.Now()
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-lctx.Done():
				return
			case <-tick.C:
			}
			if n := progress.Load(); n != last {
				last, lastChange = n, time.Now()
				continue
			}
			if time.Since(lastChange) > stallTimeout {
				tg.dump()
				close(stalled)
				cancel()
				return
			}
		}
	}()

	start := time.Now()
	deadline := start.Add(p.run)
	var wg sync.WaitGroup
	for _, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) && lctx.Err() == nil {
				p.work(c, lctx)
			}
		}()
	}
	wg.Wait()
	// The calls in flight at the deadline are counted, so the time they
	// took is too.
	st.elapsed = time.Since(start)
	cancel()
	<-watchDone
	select {
	case <-stalled:
		time.Sleep(time.Second) // let the goroutine dump reach the log
		t.Fatalf("%s, %s: no call finished for %v: deadlock\n%s", tg.name, p.name, stallTimeout, tg.log())
	default:
	}
	return st
}

// label names a phase in the report.
func (p phase) label() string { return fmt.Sprintf("%s, %d clients", p.name, p.clients) }
