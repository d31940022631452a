package snapshotter

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	cfs "github.com/containerd/continuity/fs"

	"github.com/overclone/overclone/test/loopfs"
)

// recountNow makes s count a limited snapshot's inodes again as soon as
// its tree changed (no interval), and answer from the last count however
// old it is: the background recount alone brings the figure up to date.
func recountNow(s *Snapshotter) {
	c := &s.quotas.counts
	c.mu.Lock()
	c.interval, c.maxLag = 0, time.Hour
	c.mu.Unlock()
}

// waitRecount waits until no count of the snapshot directory dir's
// inodes is scheduled or running.
func waitRecount(s *Snapshotter, dir string) {
	c := &s.quotas.counts
	for {
		var r *recount
		c.mu.Lock()
		if e := c.byDir[dir]; e != nil {
			r = e.recount
		}
		c.mu.Unlock()
		if r == nil {
			return
		}
		<-r.done
	}
}

// settledUsage is key's Usage once a count that began after every change
// made so far has ended: what the background recount brings it to. s
// recounts at once (recountNow). No count of key runs when it returns.
func settledUsage(ctx context.Context, t *testing.T, s *Snapshotter, key string) snapshots.Usage {
	t.Helper()
	dir := s.snapshotDir(s.idOf(ctx, t, key))
	// A count begun before the last change ends, this Usage sees the
	// change and starts one.
	waitRecount(s, dir)
	if _, err := s.Usage(ctx, key); err != nil {
		t.Fatal(err)
	}
	waitRecount(s, dir)
	u, err := s.Usage(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	waitRecount(s, dir) // one this Usage started, were the count unsettled
	return u
}

// holdCounts makes every count of s's wait, once begun, until the
// returned release is called; started receives the directory of each.
func holdCounts(s *Snapshotter) (started chan string, release func()) {
	started = make(chan string, 100)
	hold := make(chan struct{})
	s.quotas.counts.onCount = func(dir string) func() {
		started <- dir
		<-hold
		return func() {}
	}
	return started, sync.OnceFunc(func() { close(hold) })
}

// writeFilesOf writes n files of size bytes into dir/name.
func writeFilesOf(t *testing.T, dir, name string, n, size int) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, size)
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, name, strconv.Itoa(i)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestQgroupUsageRecount: Usage of a limited snapshot whose tree changed
// answers at once, with the bytes already counted and the inodes of the
// last count, while the recount it started is held back (were the count
// on its call path, Usage could not return); once that recount ended,
// Usage equals a walk: inodes exact, bytes within a block per inode.
func TestQgroupUsageRecount(t *testing.T) {
	root, _ := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	recountNow(s)
	if _, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	id := s.idOf(ctx, t, "limited")
	dir, upper := s.snapshotDir(id), s.upperPath(id)
	// The first Usage counts (an empty upper); none is kept yet.
	first := settledUsage(ctx, t, s, "limited")

	started, release := holdCounts(s)
	defer release()
	const files, size = 300, 8 << 10 // past btrfs's inline size: data extents
	writeFilesOf(t, upper, "d", files, size)
	call, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	u, err := s.Usage(call, "limited")
	if err != nil {
		t.Fatalf("Usage while its recount is held: %v", err)
	}
	// Bytes are the qgroup's, fresh: what was written shows (not to the
	// byte: a tree block is taken off, and a commit may be moving the
	// reservations into the counters; the walk below checks the figure).
	if u.Inodes != first.Inodes || u.Size < files*size/2 {
		t.Fatalf("Usage after %d files of %d bytes, its recount not done: %+v, want the last count (%d inodes) and the bytes written", files, size, u, first.Inodes)
	}
	if got := <-started; got != dir {
		t.Fatalf("the recount started counts %s, want %s", got, dir)
	}
	release()
	waitRecount(s, dir)
	u, err = s.Usage(ctx, "limited")
	if err != nil {
		t.Fatal(err)
	}
	walk, err := cfs.DiskUsage(ctx, upper)
	if err != nil {
		t.Fatal(err)
	}
	if u.Inodes != walk.Inodes || u.Inodes != first.Inodes+files+1 {
		t.Errorf("once recounted: Usage says %d inodes, a walk %d (%d written to %d)", u.Inodes, walk.Inodes, files+1, first.Inodes)
	}
	if d := u.Size - walk.Size; d < -4096*walk.Inodes || d > 4096*walk.Inodes {
		t.Errorf("once recounted: Usage says %d bytes, a walk %d: off by more than a block per inode", u.Size, walk.Size)
	}
}

// TestQgroupRecountOnce: callers polling limited snapshots whose trees
// change all the while never have two counts of one snapshot running at
// once, nor, with the daemon's one worker, two counts at all; with more
// workers (so that they do not hide it) still never two of one snapshot.
func TestQgroupRecountOnce(t *testing.T) {
	root, _ := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	recountNow(s)
	const snaps = 3
	for i := range snaps {
		if _, err := s.Prepare(ctx, "c"+strconv.Itoa(i), "", withMaxSize(testLimit)); err != nil {
			t.Fatal(err)
		}
	}
	var (
		mu               sync.Mutex
		running          = map[string]int{}
		most, mostOfOne  int
		counts, inFlight int
	)
	s.quotas.counts.onCount = func(dir string) func() {
		mu.Lock()
		defer mu.Unlock()
		counts++
		inFlight++
		running[dir]++
		most, mostOfOne = max(most, inFlight), max(mostOfOne, running[dir])
		return func() {
			mu.Lock()
			inFlight--
			running[dir]--
			mu.Unlock()
		}
	}
	poll := func(round int) {
		var wg sync.WaitGroup
		for i := range snaps {
			key := "c" + strconv.Itoa(i)
			upper := s.upperPath(s.idOf(ctx, t, key))
			wg.Go(func() {
				for j := range 1000 {
					name := filepath.Join(upper, "r"+strconv.Itoa(round)+"-"+strconv.Itoa(j))
					if err := os.WriteFile(name, []byte("x"), 0o644); err != nil {
						t.Error(err)
						return
					}
				}
			})
			for range 3 {
				wg.Go(func() {
					for range 40 {
						if _, err := s.Usage(ctx, key); err != nil {
							t.Error(err)
							return
						}
					}
				})
			}
		}
		wg.Wait()
		for i := range snaps {
			waitRecount(s, s.snapshotDir(s.idOf(ctx, t, "c"+strconv.Itoa(i))))
		}
	}
	poll(0)
	if most != 1 || counts <= snaps {
		t.Fatalf("one worker: %d counts, at most %d at once (want 1), more than the %d first ones", counts, most, snaps)
	}
	s.quotas.counts.slots = make(chan struct{}, 2*snaps)
	poll(1)
	if mostOfOne != 1 {
		t.Fatalf("%d counts of one snapshot ran at once", mostOfOne)
	}
	t.Logf("%d counts, at most %d at once with %d workers", counts, most, 2*snaps)
	for i := range snaps {
		key := "c" + strconv.Itoa(i)
		u := settledUsage(ctx, t, s, key)
		walk, err := cfs.DiskUsage(ctx, s.upperPath(s.idOf(ctx, t, key)))
		if err != nil {
			t.Fatal(err)
		}
		if u.Inodes != walk.Inodes {
			t.Errorf("%s: Usage says %d inodes, a walk %d", key, u.Inodes, walk.Inodes)
		}
	}
}

// TestQgroupRemoveDuringRecount: a limited snapshot removed while its
// recount runs leaves nothing: the recount stops, nothing of it is kept,
// the subvolume and its qgroup are gone.
func TestQgroupRemoveDuringRecount(t *testing.T) {
	root, mnt := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	recountNow(s)
	if _, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	id := s.idOf(ctx, t, "limited")
	dir := s.snapshotDir(id)
	qgroup := subvolIDOf(t, dir)
	settledUsage(ctx, t, s, "limited")
	started, release := holdCounts(s)
	defer release()
	writeFilesOf(t, s.upperPath(id), "d", 1000, 100)
	if _, err := s.Usage(ctx, "limited"); err != nil {
		t.Fatal(err)
	}
	<-started
	c := &s.quotas.counts
	c.mu.Lock()
	r := c.byDir[dir].recount
	c.mu.Unlock()
	if err := s.Remove(ctx, "limited"); err != nil {
		t.Fatal(err)
	}
	release()
	<-r.done
	if !errors.Is(r.err, context.Canceled) {
		t.Errorf("the recount of a removed snapshot went on: %d inodes, %v", r.n, r.err)
	}
	if err := s.Close(); err != nil { // waits for the trash
		t.Fatal(err)
	}
	if n := len(s.quotas.counts.byDir); n != 0 {
		t.Errorf("%d inode counts kept after the snapshot was removed", n)
	}
	removedClean(t, root, dir, mnt, qgroup)
}

// TestQgroupRecountInterval: with the daemon's interval, a tree that
// changed right after its count is not counted again before the interval
// is up, however often Usage is asked (one recount waits); Close ends that
// wait rather than sitting it out, and the recount never runs. A caller
// whose figure was last exact longer ago than it may be (maxLag) waits for
// the count instead, and gets the exact figure.
func TestQgroupRecountInterval(t *testing.T) {
	root, _ := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	if _, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	id := s.idOf(ctx, t, "limited")
	dir := s.snapshotDir(id)
	var mu sync.Mutex
	counts := 0
	s.quotas.counts.onCount = func(string) func() {
		mu.Lock()
		counts++
		mu.Unlock()
		return func() {}
	}
	first, err := s.Usage(ctx, "limited") // counts: an empty upper
	if err != nil {
		t.Fatal(err)
	}
	writeFilesOf(t, s.upperPath(id), "d", 10, 100)
	for range 5 {
		if u, err := s.Usage(ctx, "limited"); err != nil || u.Inodes != first.Inodes {
			t.Fatalf("Usage within the interval: %+v, %v; want the last count, %d inodes", u, err, first.Inodes)
		}
	}
	c := &s.quotas.counts
	c.mu.Lock()
	pending := c.byDir[dir].recount != nil
	c.mu.Unlock()
	mu.Lock()
	n := counts
	mu.Unlock()
	if !pending || n != 1 {
		t.Fatalf("within the interval: recount pending %v, %d counts; want one pending, 1 count", pending, n)
	}

	// Last exact too long ago: Usage waits for its count.
	c.mu.Lock()
	c.byDir[dir].recount.cancel() // the one waiting for the interval
	c.interval, c.maxLag = 0, 0
	c.mu.Unlock()
	waitRecount(s, dir)
	u, err := s.Usage(ctx, "limited")
	if err != nil || u.Inodes != first.Inodes+11 {
		t.Fatalf("Usage of a figure older than maxLag: %+v, %v; want %d inodes, counted", u, err, first.Inodes+11)
	}

	writeFilesOf(t, s.upperPath(id), "e", 10, 100)
	c.mu.Lock()
	c.interval, c.maxLag = time.Hour, time.Hour
	c.mu.Unlock()
	if _, err := s.Usage(ctx, "limited"); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	n = counts
	mu.Unlock()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if counts != n {
		t.Fatalf("Close let the recount waiting for its interval run (%d counts, %d before Close)", counts, n)
	}
}
