package crash

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
)

const (
	// minOps and minKills are what the issue asks for.
	minOps   = 1000
	minKills = 20
	// killEvery is how many calls, on average, go by between kills:
	// enough kills to reach minKills within minOps calls with room to
	// spare.
	killEvery = 30
	// maxKillDelay bounds how long after a call is sent its kill comes:
	// a metadata call takes about a millisecond here, a Commit (usage
	// walk and syncfs) a few, so kills land before, inside and after
	// calls.
	maxKillDelay = 4 * time.Millisecond
	// callTimeout is far beyond any call's time: reaching it means the
	// daemon wedged.
	callTimeout = 30 * time.Second
	// budget fails a run that takes far longer than the minute it is
	// sized for.
	budget = 3 * time.Minute
)

// snap is what the test knows a snapshot to be.
type snap struct {
	kind   snapshots.Kind
	parent string
	upper  string // active: where its files are written
	whole  bool   // active: upper shows the parents' files too (a bind)
	files  tree   // active, committed: the layer's own files
}

type op int

const (
	opPrepare op = iota
	opView
	opCommit
	opRemove
	opMounts
	opCleanup
	numOps
)

var opNames = [...]string{"Prepare", "View", "Commit", "Remove", "Mounts", "Cleanup"}

// weights is the call mix: creates and commits build the tree, removes
// keep it small enough that the final checks stay quick.
// Cleanup is rare, as containerd calls it only after its GC, but a kill in
// the middle of one must be as harmless as in any other call.
var weights = [numOps]int{opPrepare: 30, opView: 8, opCommit: 22, opRemove: 20, opMounts: 20, opCleanup: 2}

// TestCrash runs a random workload of Prepare, View, Commit, Remove, Mounts
// and (rarely) Cleanup through the socket and SIGKILLs the daemon at random
// points, restarting it each time. A call that returned success must have happened
// and one that failed must not; the one call in flight at a kill may go
// either way, and the test asks the daemon which. At the end every layer
// holds, byte for byte, what it held when committed, Walk lists exactly
// the snapshots the test expects, and after Cleanup no directory without
// metadata remains. OVERCLONE_CRASH_SEED replays a run;
// OVERCLONE_CRASH_CONFIG is the daemon's TOML (e.g. mode = "userspace").
func TestCrash(t *testing.T) {
	runCrash(t, os.Getenv("OVERCLONE_CRASH_CONFIG"), minOps, minKills, false)
}

// TestCrashDedupe is TestCrash, shorter, with dedupe = "commit": every
// layer also gets a copy of one of a few shared files, so that most
// Commits dedupe against earlier layers and kills land in the middle of
// FIDEDUPERANGE calls and of the index's transaction. Split as shipped:
// Commit dedupes the files of 64 KiB and more (the shared ones), the idle
// worker the others from 4 KiB, which it starts on after each restart
// (no Commit has run yet), so kills land in its passes too. Every committed
// layer must still hold its bytes; at the end a dedupe pass finishes what
// kills cut short, the layers are checked again, and some copies must
// share their extents.
func TestCrashDedupe(t *testing.T) {
	runCrash(t, "dedupe = \"commit\"\ndedupe_min_size = 4096\ndedupe_commit_min_size = 65536\n", dedupeOps, dedupeKills, true)
}

// dedupeOps and dedupeKills keep TestCrashDedupe to about half a minute.
const (
	dedupeOps   = 300
	dedupeKills = 10
)

func runCrash(t *testing.T, config string, minOps, minKills int, shared bool) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("OVERCLONE_CRASH_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("OVERCLONE_CRASH_SEED: %v", err)
		}
	}
	t.Logf("seed %d (OVERCLONE_CRASH_SEED=%d replays this run)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	ctx := namespaces.WithNamespace(context.Background(), "crash")

	// A filesystem of its own, so that each Commit's syncfs flushes only
	// this test's writes, not the whole machine's.
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	d := daemon.Start(t, root, config)
	w := &workload{t: t, rng: rng, d: d, sn: d.Client(), model: map[string]*snap{}, uncertain: map[string]int{}, shared: shared}

	start := time.Now()
	for w.ops < minOps || w.kills < minKills {
		if time.Since(start) > budget {
			t.Fatalf("%d calls and %d kills in %v: too slow", w.ops, w.kills, budget)
		}
		w.step(ctx)
	}
	elapsed := time.Since(start)

	// One last kill with nothing in flight, then everything is checked
	// on what the restarted daemon says.
	w.crash(ctx)
	lostBytes := w.verifyContent(ctx)
	if shared {
		lostBytes += w.finishDedupe(ctx)
	}
	c, ok := w.sn.(snapshots.Cleaner)
	if !ok {
		t.Fatal("the proxy client does not offer Cleanup")
	}
	if err := c.Cleanup(ctx); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	// Cleanup leaves the trash to the background deleter; wait for it
	// here, so that the stop is not cut short deleting and the check
	// below sees the trash emptied by the daemon, not by the next start.
	waitTrashEmpty(t, root)
	if err := d.Stop(); err != nil {
		t.Fatalf("clean stop: %v", err)
	}
	w.verifyDisk(root)

	t.Logf("%d calls, %d kills survived (%d mid-call), %v; calls by method %v; calls cut by a kill that took effect / did not: %v; committed layers checked %d, bytes lost %d",
		w.ops, w.kills, w.midCall, elapsed.Round(time.Millisecond), w.methods(), w.uncertain, w.checked, lostBytes)
	if lostBytes != 0 {
		t.Fatalf("%d bytes of committed layers lost", lostBytes)
	}
}

type workload struct {
	t     *testing.T
	rng   *rand.Rand
	d     *daemon.Daemon
	sn    snapshots.Snapshotter
	model map[string]*snap
	seq   int

	ops, kills, midCall int
	checked             int
	byMethod            [numOps]int
	uncertain           map[string]int
	// shared: every new layer also holds a copy of a shared file.
	shared bool
}

func (w *workload) methods() map[string]int {
	out := map[string]int{}
	for o, n := range w.byMethod {
		out[opNames[o]] = n
	}
	return out
}

// step makes one call, perhaps with a kill on its way.
func (w *workload) step(ctx context.Context) {
	t := w.t
	o, key, parent, name, ok := w.pick()
	if !ok {
		return
	}
	var killed chan struct{}
	if w.rng.IntN(killEvery) == 0 {
		killed = make(chan struct{})
		delay := time.Duration(w.rng.Int64N(int64(maxKillDelay)))
		time.AfterFunc(delay, func() {
			w.d.Signal(syscall.SIGKILL)
			close(killed)
		})
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	var err error
	switch o {
	case opPrepare:
		_, err = w.sn.Prepare(cctx, key, parent)
	case opView:
		_, err = w.sn.View(cctx, key, parent)
	case opCommit:
		err = w.sn.Commit(cctx, name, key)
	case opRemove:
		err = w.sn.Remove(cctx, key)
	case opCleanup:
		err = w.sn.(snapshots.Cleaner).Cleanup(cctx)
	case opMounts:
		var mounts []string
		mounts, err = w.mounts(cctx, key)
		if err == nil {
			for _, p := range mounts {
				if _, serr := os.Stat(p); serr != nil {
					t.Fatalf("Mounts(%q) names %s: %v", key, p, serr)
				}
			}
		}
	}
	cancel()
	w.ops++
	w.byMethod[o]++

	cut := killed != nil && err != nil && (errdefs.IsUnavailable(err) || errdefs.IsCanceled(err) || errors.Is(err, context.Canceled))
	switch {
	case err == nil:
		w.apply(ctx, o, key, parent, name)
	case cut:
		w.midCall++
	default:
		t.Fatalf("%s(%q, %q, %q): %v (seed in the log replays it)", opNames[o], key, parent, name, err)
	}
	if killed == nil {
		return
	}
	<-killed
	w.crash(ctx)
	if cut {
		w.resolve(ctx, o, key, parent, name)
	}
	w.compareWalk(ctx)
}

func (w *workload) mounts(ctx context.Context, key string) ([]string, error) {
	m, err := w.sn.Mounts(ctx, key)
	if err != nil {
		return nil, err
	}
	return mountedPaths(m), nil
}

// pick chooses a call that must succeed on what the model holds.
func (w *workload) pick() (o op, key, parent, name string, ok bool) {
	total := 0
	for _, wt := range weights {
		total += wt
	}
	r := w.rng.IntN(total)
	for o = 0; r >= weights[o]; o++ {
		r -= weights[o]
	}
	w.seq++
	fresh := "crash/" + strconv.Itoa(w.seq)
	switch o {
	case opPrepare:
		if w.rng.IntN(3) > 0 {
			parent, _ = w.random(snapshots.KindCommitted)
		}
		return o, fresh, parent, "", true
	case opView:
		parent, ok = w.random(snapshots.KindCommitted)
		return o, fresh, parent, "", ok
	case opCommit:
		key, ok = w.random(snapshots.KindActive)
		return o, key, "", fresh, ok
	case opRemove:
		key, ok = w.randomLeaf()
		return o, key, "", "", ok
	case opCleanup:
		return o, "", "", "", true
	default:
		if key, ok = w.random(snapshots.KindActive); !ok || w.rng.IntN(4) == 0 {
			key, ok = w.random(snapshots.KindView)
		}
		return o, key, "", "", ok
	}
}

// random picks a snapshot of kind, in a stable order so that a seed
// replays.
func (w *workload) random(kind snapshots.Kind) (string, bool) {
	var keys []string
	for k, s := range w.model {
		if s.kind == kind {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return "", false
	}
	sort.Strings(keys)
	return keys[w.rng.IntN(len(keys))], true
}

func (w *workload) randomLeaf() (string, bool) {
	parents := map[string]bool{}
	for _, s := range w.model {
		parents[s.parent] = true
	}
	var keys []string
	for k := range w.model {
		if !parents[k] {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return "", false
	}
	sort.Strings(keys)
	return keys[w.rng.IntN(len(keys))], true
}

// apply records a call that happened; a new active gets its files.
func (w *workload) apply(ctx context.Context, o op, key, parent, name string) {
	switch o {
	case opPrepare:
		w.model[key] = &snap{kind: snapshots.KindActive, parent: parent}
		w.fill(ctx, key)
	case opView:
		w.model[key] = &snap{kind: snapshots.KindView, parent: parent}
	case opCommit:
		s := w.model[key]
		delete(w.model, key)
		s.kind, s.upper = snapshots.KindCommitted, ""
		w.model[name] = s
	case opRemove:
		delete(w.model, key)
	}
}

// fill writes an active's files straight into its upper, as containerd's
// diff applier does. The daemon may be dead by now: the directory is not.
func (w *workload) fill(ctx context.Context, key string) {
	s := w.model[key]
	dir, whole, err := w.upper(ctx, key)
	if err != nil {
		w.t.Fatal(err)
	}
	files, err := writeFiles(w.rng, dir, strconv.Itoa(w.seq), w.shared)
	if err != nil {
		w.t.Fatalf("write into %s: %v", dir, err)
	}
	s.upper, s.whole, s.files = dir, whole, files
}

// upper finds an active's upper from its mounts, asking a live daemon.
func (w *workload) upper(ctx context.Context, key string) (string, bool, error) {
	for i := 0; ; i++ {
		m, err := w.sn.Mounts(ctx, key)
		if err == nil {
			return upperOf(m)
		}
		if !errdefs.IsUnavailable(err) || i > 0 {
			return "", false, fmt.Errorf("mounts of %q: %w", key, err)
		}
		// Killed right after the Prepare returned: ask after the
		// restart, which the caller is about to do anyway.
		w.crash(ctx)
	}
}

// crash reaps the killed daemon (or kills a live one) and starts it again.
func (w *workload) crash(ctx context.Context) {
	w.d.Kill()
	w.kills++
	if err := w.d.Restart(); err != nil {
		w.t.Fatalf("restart after kill %d: %v", w.kills, err)
	}
	w.sn = w.d.Client()
}

// resolve asks the restarted daemon what became of a call cut by a kill
// and records it.
func (w *workload) resolve(ctx context.Context, o op, key, parent, name string) {
	exists := func(k string) bool {
		_, err := w.sn.Stat(ctx, k)
		if err != nil && !errdefs.IsNotFound(err) {
			w.t.Fatalf("stat %q after restart: %v", k, err)
		}
		return err == nil
	}
	var took bool
	switch o {
	case opPrepare, opView:
		if took = exists(key); took {
			w.apply(ctx, o, key, parent, name)
		}
	case opCommit:
		committed, active := exists(name), exists(key)
		if committed == active {
			w.t.Fatalf("Commit(%q, %q) cut by a kill: committed %v, active %v: half done", name, key, committed, active)
		}
		if took = committed; took {
			w.apply(ctx, o, key, parent, name)
		}
	case opRemove:
		if took = !exists(key); took {
			w.apply(ctx, o, key, parent, name)
		}
	default:
		return
	}
	w.uncertain[fmt.Sprintf("%s took effect %v", opNames[o], took)]++
}

// compareWalk checks that Walk lists exactly the model's snapshots.
func (w *workload) compareWalk(ctx context.Context) {
	got := map[string]snapshots.Info{}
	if err := w.sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		got[info.Name] = info
		return nil
	}); err != nil {
		w.t.Fatalf("walk after kill %d: %v", w.kills, err)
	}
	for k, s := range w.model {
		info, ok := got[k]
		if !ok {
			w.t.Fatalf("after kill %d: %q (%v) is gone", w.kills, k, s.kind)
		}
		if info.Kind != s.kind || info.Parent != s.parent {
			w.t.Fatalf("after kill %d: %q is %v on %q, want %v on %q", w.kills, k, info.Kind, info.Parent, s.kind, s.parent)
		}
	}
	for k := range got {
		if _, ok := w.model[k]; !ok {
			w.t.Fatalf("after kill %d: %q appeared", w.kills, k)
		}
	}
}

// verifyContent compares every layer with what was written into it and
// returns the bytes lost.
func (w *workload) verifyContent(ctx context.Context) int64 {
	w.compareWalk(ctx)
	var total int64
	keys := make([]string, 0, len(w.model))
	for k := range w.model {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		s := w.model[k]
		var (
			dir   string
			whole bool
		)
		switch s.kind {
		case snapshots.KindActive:
			dir, whole = s.upper, s.whole
		case snapshots.KindCommitted:
			// A view's top layer is the committed layer itself.
			view := "verify/" + k
			m, err := w.sn.View(ctx, view, k)
			if err != nil {
				w.t.Fatalf("view of %q: %v", k, err)
			}
			if dir, whole, err = topLayer(m); err != nil {
				w.t.Fatal(err)
			}
			defer w.sn.Remove(ctx, view)
			w.checked++
		default:
			continue
		}
		got, err := readTree(dir)
		if err != nil {
			w.t.Errorf("read %q at %s: %v", k, dir, err)
			continue
		}
		want := s.files
		if whole {
			want = w.image(k)
		}
		if n, diff := lost(want, got); diff != "" {
			w.t.Errorf("%v %q differs: %s", s.kind, k, diff)
			total += n
		}
	}
	return total
}

// image is what key shows whole: its files over its parents'. Names are
// unique to the call that wrote them, so nothing is hidden.
func (w *workload) image(key string) tree {
	s := w.model[key]
	if s.parent == "" {
		return s.files
	}
	return merge(w.image(s.parent), s.files)
}

// verifyDisk opens the stopped daemon's metadata and checks that every
// directory under snapshots/ belongs to a snapshot and the trash is empty.
func (w *workload) verifyDisk(root string) {
	t := w.t
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close()
	var ids map[string]string
	if err := ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		ids, err = storage.IDMap(ctx)
		return err
	}); err != nil {
		t.Fatalf("the metadata does not open after the run: %v", err)
	}
	entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if _, ok := ids[e.Name()]; !ok {
			t.Errorf("after Cleanup, snapshots/%s has no metadata", e.Name())
		}
	}
	for id, key := range ids {
		if _, err := os.Stat(filepath.Join(root, "snapshots", id, "fs")); err != nil {
			t.Errorf("snapshot %q (id %s) has no directory: %v", key, id, err)
		}
	}
	if trash, _ := os.ReadDir(filepath.Join(root, "trash")); len(trash) != 0 {
		t.Errorf("trash not empty after Cleanup and its deletions: %d entries", len(trash))
	}
	if len(ids) != len(w.model) {
		t.Errorf("%d snapshots in the metadata, %d expected", len(ids), len(w.model))
	}
}

// waitTrashEmpty waits until root's trash has no entries.
func waitTrashEmpty(t *testing.T, root string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		entries, err := os.ReadDir(filepath.Join(root, "trash"))
		if err != nil {
			t.Fatal(err)
		}
		if len(entries) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d entries still in the trash a minute after Cleanup", len(entries))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// finishDedupe runs a dedupe pass for what kills cut short, checks every
// layer again and that some committed copies share their extents, and
// returns the bytes lost.
func (w *workload) finishDedupe(ctx context.Context) int64 {
	conn, err := grpc.NewClient("unix://"+w.d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		w.t.Fatal(err)
	}
	defer conn.Close()
	sum, err := snapshotter.AskDedupe(ctx, conn, false, nil)
	if err != nil {
		w.t.Fatalf("dedupe pass after the last kill: %v", err)
	}
	lost := w.verifyContent(ctx)
	sharing, err := snapshotter.AskSharing(ctx, conn)
	if err != nil {
		w.t.Fatal(err)
	}
	var committed, sharedBytes int64
	for _, sh := range sharing {
		if sh.Kind == snapshots.KindCommitted.String() {
			committed++
			sharedBytes += sh.Shared
		}
	}
	w.t.Logf("final dedupe pass: %+v; %d committed layers hold %d shared bytes", sum, committed, sharedBytes)
	if committed > int64(len(sharedSizes)) && sharedBytes == 0 {
		w.t.Errorf("%d committed layers with copies of %d shared files share nothing", committed, len(sharedSizes))
	}
	return lost
}
