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
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/snapshotter/metrics"
	"github.com/overclone/overclone/test/builtin"
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

	// The write phase is a quarter of the mixed one, within these
	// bounds, and runs in writeTurns turns per target: with the mixed
	// phase run on both targets, it keeps the package within twice its
	// time before the comparison (30 s: 7.5 s per target; CI's 10 s: 5 s).
	minWriteRun = 5 * time.Second
	maxWriteRun = 10 * time.Second
	writeTurns  = 2
	// singleRun is the one-client write phase per target: its calls take
	// milliseconds, so a second per turn gives hundreds of samples.
	singleRun = 2 * time.Second

	// What CI asserts of the 64-client write phase, overclone over the
	// built-in. Goal 3 asks for 3x the throughput and a p99 no higher.
	// Eight runs on a shared 2-core VM (load average 6-12), 10 s and
	// 30 s: throughput 3.2x to 9.6x, p99 0.27x to 0.83x. The throughput
	// ratio is asserted at 2x, not 3x: it falls as the built-in's
	// fdatasyncs get cheaper (it ran at 240 to 600 calls/s with the
	// machine's other jobs), so a faster CI disk lowers it, while losing
	// group commit takes it to about 1x, one transaction and one
	// fdatasync per call again; 2x still catches that. The p99 bound is the goal's own: the built-in's p99 is each
	// call queued behind the other clients' fdatasyncs, which group
	// commit removes, and it held in every run. The mixed phase and the
	// one-client phase are reported only: the mixed one includes reads,
	// which goal 3 is not about, and one client gives a few hundred
	// samples, whose p99 is one stray sample.
	minThroughputRatio = 2.0
	maxP99Ratio        = 1.0
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

func TestMain(m *testing.M) {
	// The built-in's server is this binary executed again (test/builtin).
	builtin.ServeIfAsked()
	os.Exit(m.Run())
}

// TestLoad: 64 clients, each on its own connection, run a mix of every
// call on parents of their own and on shared ones, and fight over a few
// shared keys. No call may hang, no error may fall outside the expected
// classes; latency per method is reported. OVERCLONE_LOAD_CONFIG is the
// daemon's TOML (e.g. "sync_on_commit = false", to see what durability
// costs under load).
//
// The same clients then run against containerd's built-in overlayfs
// snapshotter, served from a process of its own as containerd ships it,
// and both targets run the write-heavy phase of issue 12 (64 clients
// doing nothing but Prepare, Commit, Remove: a node starting 100 pods)
// and the same with one client. The comparison is logged and written to
// results/load.md.
func TestLoad(t *testing.T) {
	run := duration(t)
	writeRun := min(max(run/4, minWriteRun), maxWriteRun)
	seed := uint64(time.Now().UnixNano())
	t.Logf("%d clients for %v per target, write phase %v per target, seed %d", clients, run, writeRun, seed)
	ctx := namespaces.WithNamespace(context.Background(), "load")
	oc, d := startOverclone(t)
	bi, srv := startBuiltin(t)
	targets := []*target{oc, bi}
	for _, tg := range targets {
		makeShared(t, ctx, tg)
	}
	loadavg, _ := os.ReadFile("/proc/loadavg")

	mixed := phase{name: "mixed", clients: clients, run: run, seed: seed, work: (*client).step, prefix: "mixed"}
	got := map[string]*stats{}
	for _, tg := range targets {
		st := runPhase(t, ctx, tg, mixed)
		t.Logf("%s, %s: %d calls in %v\n%s", tg.name, mixed.label(), st.calls(), st.elapsed.Round(time.Millisecond), st.table())
		got[tg.name] = st
	}
	cs := []comparison{{mixed.label(), got[overclone], got[builtIn]}}

	// The write phases run in turns, overclone first then the built-in
	// first, so that a burst of load from elsewhere on the machine is
	// less likely to fall on one target only.
	for _, p := range []phase{
		{name: "writes", clients: clients, run: writeRun / writeTurns, seed: seed, work: (*client).cycle},
		{name: "writes", clients: 1, run: singleRun / writeTurns, seed: seed, work: (*client).cycle},
	} {
		sum := map[string]*stats{overclone: newStats(), builtIn: newStats()}
		for turn := range writeTurns {
			order := targets
			if turn%2 == 1 {
				order = []*target{bi, oc}
			}
			for _, tg := range order {
				p.prefix = fmt.Sprintf("%s-%d-%d", p.name, p.clients, turn)
				sum[tg.name].merge(runPhase(t, ctx, tg, p))
			}
		}
		for _, tg := range targets {
			st := sum[tg.name]
			t.Logf("%s, %s: %d calls in %v\n%s", tg.name, p.label(), st.calls(), st.elapsed.Round(time.Millisecond), st.table())
		}
		cs = append(cs, comparison{p.label(), sum[overclone], sum[builtIn]})
	}

	table := markdown(cs)
	t.Logf("overclone next to the built-in:\n%s", table)
	report := fmt.Sprintf("# overclone under load, next to containerd's built-in overlayfs\n\n"+
		"%s. %d clients; mixed phase %v per target, write phase %v and one client %v per target (%d turns each); seed %d; load average before: %s.\n\n"+
		"overclone: the daemon, config %q (empty: shipped defaults, sync on Commit). built-in: containerd's overlayfs snapshotter as its plugin registers it (asynchronous remove), served from a process of its own. Each on a loop xfs of its own.\n\n%s",
		time.Now().UTC().Format(time.RFC3339), clients, run, writeRun, singleRun, writeTurns, seed,
		strings.TrimSpace(string(loadavg)), os.Getenv("OVERCLONE_LOAD_CONFIG"), table)
	if path, err := writeResults(report); err != nil {
		t.Logf("results not written: %v", err)
	} else {
		t.Logf("results in %s", path)
	}

	checkClasses(t, cs)
	checkRatios(t, cs[1])

	// Still serving, and a clean stop does not wait on anything stuck.
	if _, err := d.Client().Stat(ctx, "shared/base"); err != nil {
		t.Fatalf("after the load: %v", err)
	}
	if err := d.Stop(); err != nil {
		t.Fatalf("clean stop after the load: %v", err)
	}
	if err := srv.Stop(); err != nil {
		t.Logf("the built-in's stop: %v\n%s", err, srv.Log())
	}
}

// checkClasses fails the test on an error of overclone's outside the
// expected classes (in the write phases, where no two clients share a
// key, on any error). The built-in's are only logged: it is not ours to
// fix, and the report says what it answers differently.
func checkClasses(t *testing.T, cs []comparison) {
	for i, c := range cs {
		for _, side := range []struct {
			name string
			st   *stats
		}{{overclone, c.ours}, {builtIn, c.theirs}} {
			report := t.Errorf
			if side.name == builtIn {
				report = t.Logf
			}
			side.st.mu.Lock()
			for k, n := range side.st.errors {
				var class string
				fmt.Sscanf(k, "%s %s", new(string), &class)
				if i > 0 || !expected[class] {
					report("%s, %s: %d unexpected errors: %s", side.name, c.label, n, k)
				}
			}
			for _, msg := range side.st.unexpected {
				report("%s, %s: %s", side.name, c.label, msg)
			}
			side.st.mu.Unlock()
		}
	}
}

// checkRatios asserts goal 3 on the write phase, as far as this machine
// can measure it steadily.
func checkRatios(t *testing.T, c comparison) {
	r := c.row("writes", writeMethods...)
	t.Logf("%s: throughput %.2fx the built-in's, p99 %.2fx", c.label, r.throughput(), r.p99())
	if r.throughput() < minThroughputRatio {
		t.Errorf("%s: overclone's throughput is %.2fx the built-in's, want at least %.1fx", c.label, r.throughput(), minThroughputRatio)
	}
	if r.p99() > maxP99Ratio {
		t.Errorf("%s: overclone's p99 is %.2fx the built-in's, want at most %.1fx", c.label, r.p99(), maxP99Ratio)
	}
}

// client is one connection with its own snapshots.
type client struct {
	id       int
	prefix   string
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
	return fmt.Sprintf("%s/c%d/%s/%d", c.prefix, c.id, kind, c.seq)
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
			c.stats.noteUnexpected(fmt.Sprintf("client %d %s: %v", c.id, method, err))
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
			c.stats.noteUnexpected(fmt.Sprintf("removing a parent with children: %v", err))
		}
	}
}

// cycle is one snapshot's life on a node starting pods or unpacking: a
// Prepare on the image, its files written, a Commit, and the Remove that
// garbage collection makes of it later. Every key is the client's own: no
// call has a race to lose.
func (c *client) cycle(ctx context.Context) {
	key, name := c.key("w"), c.key("wc")
	var m []mount.Mount
	if c.call(ctx, "Prepare", func(ctx context.Context) (err error) { m, err = c.sn.Prepare(ctx, key, "shared/mid"); return }) != nil {
		return
	}
	writeInto(m)
	if c.call(ctx, "Commit", func(ctx context.Context) error { return c.sn.Commit(ctx, name, key) }) != nil {
		return
	}
	c.call(ctx, "Remove", func(ctx context.Context) error { return c.sn.Remove(ctx, name) })
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
