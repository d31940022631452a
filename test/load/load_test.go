package load

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/overclone/overclone/snapshotter/metrics"
	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
)

const (
	// clients is how many connect at once: a node pulling many images
	// while CRI polls usage.
	clients = 64
	// fullDuration is the length of a run; shortDuration fits a
	// CI job; OVERCLONE_LOAD_DURATION sets any other.
	fullDuration  = 30 * time.Second
	shortDuration = 10 * time.Second
	// callTimeout: a call this slow is a wedge, not load.
	callTimeout = time.Minute
	// stallTimeout is how long the watchdog lets the whole run go
	// without a single call finishing before it calls it a deadlock.
	stallTimeout = 45 * time.Second
	// maxOwn bounds each client's snapshots, so that Walk and the
	// final checks stay small however long the run.
	maxOwn = 8
	// races is how many shared keys the clients fight over.
	races = 4
)

// expected are the classes concurrent clients on shared keys produce by
// design: a key taken (AlreadyExists), gone (NotFound), a parent with
// children or a key re-prepared under a Commit (FailedPrecondition).
var expected = map[string]bool{"not_found": true, "already_exists": true, "failed_precondition": true}

func duration(t *testing.T) time.Duration {
	if s := os.Getenv("OVERCLONE_LOAD_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("OVERCLONE_LOAD_DURATION: %v", err)
		}
		return d
	}
	if testing.Short() {
		return shortDuration
	}
	return fullDuration
}

// TestLoad: 64 clients, each on its own connection, run a mix of every
// call on parents of their own and on shared ones, and fight over a few
// shared keys. No call may hang, no error may fall outside the expected
// classes; latency per method is reported. OVERCLONE_LOAD_CONFIG is the
// daemon's TOML (e.g. "sync_on_commit = false", to see what durability
// costs under load).
func TestLoad(t *testing.T) {
	run := duration(t)
	seed := uint64(time.Now().UnixNano())
	t.Logf("%d clients for %v, seed %d", clients, run, seed)
	ctx := namespaces.WithNamespace(context.Background(), "load")
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	d := daemon.Start(t, root, os.Getenv("OVERCLONE_LOAD_CONFIG"))
	sn := d.Client()

	// The shared parents: a base and a layer on it.
	for _, step := range []func() error{
		func() error { _, err := sn.Prepare(ctx, "shared/base-a", ""); return err },
		func() error { return sn.Commit(ctx, "shared/base", "shared/base-a") },
		func() error { _, err := sn.Prepare(ctx, "shared/mid-a", "shared/base"); return err },
		func() error { return sn.Commit(ctx, "shared/mid", "shared/mid-a") },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}

	st := newStats()
	var progress atomic.Int64
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	deadline := time.Now().Add(run)

	// The watchdog: calls finish all the time under load; none for
	// stallTimeout means a deadlock. The daemon's goroutines go to its
	// log (SIGQUIT) for the post-mortem.
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
				d.Signal(syscall.SIGQUIT)
				close(stalled)
				cancel()
				return
			}
		}
	}()

	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		conn, err := grpc.NewClient("unix://"+d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		c := &client{
			id:       i,
			sn:       proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "overclone"),
			rng:      rand.New(rand.NewPCG(seed, uint64(i))),
			stats:    st,
			progress: &progress,
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) && lctx.Err() == nil {
				c.step(lctx)
			}
		}()
	}
	wg.Wait()
	cancel()
	<-watchDone
	select {
	case <-stalled:
		time.Sleep(time.Second) // let the goroutine dump reach the log
		t.Fatalf("no call finished for %v: deadlock\n%s", stallTimeout, d.Log())
	default:
	}

	t.Logf("%d calls in %v\n%s", st.calls(), run, st.table())
	st.mu.Lock()
	for k, n := range st.errors {
		var class string
		fmt.Sscanf(k, "%s %s", new(string), &class)
		if !expected[class] {
			t.Errorf("%d unexpected errors: %s", n, k)
		}
	}
	st.mu.Unlock()
	firstUnexpectedMu.Lock()
	for _, msg := range firstUnexpected {
		t.Error(msg)
	}
	firstUnexpectedMu.Unlock()

	// Still serving, and a clean stop does not wait on anything stuck.
	if _, err := sn.Stat(ctx, "shared/base"); err != nil {
		t.Fatalf("after the load: %v", err)
	}
	if err := d.Stop(); err != nil {
		t.Fatalf("clean stop after the load: %v", err)
	}
}

// firstUnexpected keeps the first few unexpected errors whole, for the
// failure message.
var (
	firstUnexpectedMu sync.Mutex
	firstUnexpected   []string
)

// client is one connection with its own snapshots.
type client struct {
	id       int
	sn       snapshots.Snapshotter
	rng      *rand.Rand
	stats    *stats
	progress *atomic.Int64
	seq      int

	actives   []string // own actives
	committed []string // own committed layers (no children kept)
	views     []string
}

func (c *client) key(kind string) string {
	c.seq++
	return fmt.Sprintf("c%d/%s/%d", c.id, kind, c.seq)
}

// call times fn as method and records its error class.
func (c *client) call(ctx context.Context, method string, fn func(context.Context) error) error {
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	start := time.Now()
	err := fn(cctx)
	elapsed := time.Since(start)
	if ctx.Err() != nil {
		return err // the run was stopped: not the daemon's doing
	}
	c.progress.Add(1)
	class := ""
	if err != nil {
		class = metrics.Class(err)
		if !expected[class] {
			firstUnexpectedMu.Lock()
			if len(firstUnexpected) < 5 {
				firstUnexpected = append(firstUnexpected, fmt.Sprintf("client %d %s: %v", c.id, method, err))
			}
			firstUnexpectedMu.Unlock()
		}
	}
	c.stats.add(method, elapsed, class)
	return err
}

func (c *client) pick(list []string) string { return list[c.rng.IntN(len(list))] }

func drop(list []string, key string) []string {
	for i, k := range list {
		if k == key {
			return append(list[:i], list[i+1:]...)
		}
	}
	return list
}

func (c *client) parent() string {
	switch r := c.rng.IntN(4); {
	case r == 0:
		return ""
	case r == 1 && len(c.committed) > 0:
		return c.pick(c.committed)
	case r == 2:
		return "shared/mid"
	default:
		return "shared/base"
	}
}

// step makes one call, chosen from what the client has.
func (c *client) step(ctx context.Context) {
	own := len(c.actives) + len(c.committed) + len(c.views)
	switch r := c.rng.IntN(100); {
	case r < 18 && own < maxOwn:
		key, parent := c.key("a"), c.parent()
		var m []mount.Mount
		if c.call(ctx, "Prepare", func(ctx context.Context) (err error) { m, err = c.sn.Prepare(ctx, key, parent); return }) == nil {
			c.actives = append(c.actives, key)
			writeInto(m)
		}
	case r < 28 && len(c.actives) > 0:
		key, name := c.pick(c.actives), c.key("c")
		if c.call(ctx, "Commit", func(ctx context.Context) error { return c.sn.Commit(ctx, name, key) }) == nil {
			c.actives = drop(c.actives, key)
			c.committed = append(c.committed, name)
		}
	case r < 34 && own < maxOwn:
		key, parent := c.key("v"), "shared/mid"
		if len(c.committed) > 0 && c.rng.IntN(2) == 0 {
			parent = c.pick(c.committed)
		}
		if c.call(ctx, "View", func(ctx context.Context) error { _, err := c.sn.View(ctx, key, parent); return err }) == nil {
			c.views = append(c.views, key)
		}
	case r < 46 && len(c.actives)+len(c.views) > 0:
		key := c.pick(append(append([]string(nil), c.actives...), c.views...))
		c.call(ctx, "Mounts", func(ctx context.Context) error { _, err := c.sn.Mounts(ctx, key); return err })
	case r < 56:
		key := "shared/base"
		if own > 0 && c.rng.IntN(2) == 0 {
			key = c.pick(append(append(append([]string(nil), c.actives...), c.views...), c.committed...))
		}
		c.call(ctx, "Stat", func(ctx context.Context) error { _, err := c.sn.Stat(ctx, key); return err })
	case r < 64 && len(c.actives)+len(c.committed) > 0:
		key := c.pick(append(append([]string(nil), c.actives...), c.committed...))
		c.call(ctx, "Usage", func(ctx context.Context) error { _, err := c.sn.Usage(ctx, key); return err })
	case r < 68 && own > 0:
		key := c.pick(append(append(append([]string(nil), c.actives...), c.views...), c.committed...))
		info := snapshots.Info{Name: key, Labels: map[string]string{"containerd.io/snapshot/load": strconv.Itoa(c.seq)}}
		c.call(ctx, "Update", func(ctx context.Context) error {
			_, err := c.sn.Update(ctx, info, "labels.containerd.io/snapshot/load")
			return err
		})
	case r < 70:
		c.call(ctx, "Walk", func(ctx context.Context) error {
			return c.sn.Walk(ctx, func(context.Context, snapshots.Info) error { return nil }, "parent==shared/mid")
		})
	case r < 88 && own > 0:
		c.removeOwn(ctx)
	case r < 99:
		c.race(ctx)
	case r < 100:
		// Cleanup holds the write transaction while it lists the
		// root: it must not wedge the others.
		c.call(ctx, "Cleanup", func(ctx context.Context) error { return c.sn.(snapshots.Cleaner).Cleanup(ctx) })
	default:
		c.removeOwn(ctx)
	}
}

// removeOwn removes one of the client's snapshots that has no children
// (a committed layer of its own may be a parent of its actives or views).
func (c *client) removeOwn(ctx context.Context) {
	all := append(append(append([]string(nil), c.actives...), c.views...), c.committed...)
	if len(all) == 0 {
		return
	}
	key := c.pick(all)
	err := c.call(ctx, "Remove", func(ctx context.Context) error { return c.sn.Remove(ctx, key) })
	if err == nil {
		c.actives, c.views, c.committed = drop(c.actives, key), drop(c.views, key), drop(c.committed, key)
	}
}

// race fights the other clients over the shared keys.
func (c *client) race(ctx context.Context) {
	n := c.rng.IntN(races)
	key := "shared/race/" + strconv.Itoa(n)
	switch c.rng.IntN(4) {
	case 0:
		c.call(ctx, "Prepare", func(ctx context.Context) error { _, err := c.sn.Prepare(ctx, key, "shared/base"); return err })
	case 1:
		name := c.key("race")
		if c.call(ctx, "Commit", func(ctx context.Context) error { return c.sn.Commit(ctx, name, key) }) == nil {
			c.call(ctx, "Remove", func(ctx context.Context) error { return c.sn.Remove(ctx, name) })
		}
	case 2:
		c.call(ctx, "Remove", func(ctx context.Context) error { return c.sn.Remove(ctx, key) })
	default:
		// Has children for as long as the run lasts.
		err := c.call(ctx, "Remove", func(ctx context.Context) error { return c.sn.Remove(ctx, "shared/base") })
		if err == nil || !errors.Is(err, errdefs.ErrFailedPrecondition) {
			firstUnexpectedMu.Lock()
			firstUnexpected = append(firstUnexpected, fmt.Sprintf("removing a parent with children: %v", err))
			firstUnexpectedMu.Unlock()
		}
	}
}

// writeInto puts one small file in a new active's upper, so that its
// Commit has something to walk and sync.
func writeInto(m []mount.Mount) {
	if len(m) != 1 {
		return
	}
	dir := m[0].Source
	for _, o := range m[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			dir = v
		}
	}
	os.WriteFile(filepath.Join(dir, "file"), make([]byte, 4096), 0o644)
}
