package load

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/overclone/overclone/snapshotter/metrics"
	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
)

// stormKeys is how many keys every client fights over.
const stormKeys = 48

// TestStorm: 64 clients do nothing but fight over one small set of keys
// through the socket: Prepare, Commit, Remove and View of the same keys,
// with Cleanup (containerd's GC) mixed in. Every call must end in success
// or in the class its lost race deserves, and the daemon must survive it
// (a WaitGroup reused between Removes and Cleanup used to panic it in two
// runs of five).
func TestStorm(t *testing.T) {
	run := min(duration(t), 15*time.Second)
	seed := uint64(time.Now().UnixNano())
	t.Logf("%d clients on %d keys for %v, seed %d", clients, stormKeys, run, seed)
	ctx := namespaces.WithNamespace(context.Background(), "storm")
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	d := daemon.Start(t, root, "")

	var (
		mu      sync.Mutex
		classes = map[string]int{}
		bad     []string
	)
	record := func(method string, err error) {
		class := "ok"
		if err != nil {
			class = metrics.Class(err)
		}
		mu.Lock()
		defer mu.Unlock()
		classes[method+" "+class]++
		if err != nil && !expected[class] && len(bad) < 5 {
			bad = append(bad, fmt.Sprintf("%s: %v", method, err))
		}
	}

	deadline := time.Now().Add(run)
	var wg sync.WaitGroup
	for i := range clients {
		conn, err := grpc.NewClient("unix://"+d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "overclone")
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				stormStep(ctx, sn, rng, record)
			}
		}()
	}
	wg.Wait()

	var lines []string
	for k, n := range classes {
		lines = append(lines, fmt.Sprintf("%s %d", k, n))
	}
	t.Logf("calls by outcome:\n%s", strings.Join(lines, "\n"))
	for _, b := range bad {
		t.Error(b)
	}
	if err := d.Stop(); err != nil {
		t.Fatalf("the daemon did not survive the storm: %v\n%s", err, d.Log())
	}
	if strings.Contains(d.Log(), "panic") {
		t.Fatalf("the daemon panicked:\n%s", d.Log())
	}
}

// stormStep makes one call on a random shared key: active keys a/N,
// committed c/N (on the base, or on another committed one), views v/N.
func stormStep(ctx context.Context, sn snapshots.Snapshotter, rng *rand.Rand, record func(string, error)) {
	n := rng.IntN(stormKeys)
	active, committed, view := fmt.Sprint("a/", n), fmt.Sprint("c/", n), fmt.Sprint("v/", n)
	parent := ""
	if rng.IntN(2) == 0 {
		parent = fmt.Sprint("c/", rng.IntN(stormKeys))
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	switch r := rng.IntN(100); {
	case r < 25:
		m, err := sn.Prepare(cctx, active, parent)
		record("Prepare", err)
		if err == nil {
			writeInto(m)
		}
	case r < 45:
		record("Commit", sn.Commit(cctx, committed, active))
	case r < 55:
		_, err := sn.View(cctx, view, parent)
		record("View", err)
	case r < 85:
		key := []string{active, committed, view}[rng.IntN(3)]
		record("Remove", sn.Remove(cctx, key))
	default:
		record("Cleanup", sn.(snapshots.Cleaner).Cleanup(cctx))
	}
}
