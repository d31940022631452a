package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// TestCommitRemovedMeanwhile: a Remove of the key that lands while Commit
// walks or syncs the layer makes Commit fail with NotFound, as containerd's
// built-in snapshotter does (it checks the key in the same transaction),
// never with an unclassified I/O error about the vanished directory.
func TestCommitRemovedMeanwhile(t *testing.T) {
	ctx, s := openTest(t, t.TempDir(), WithSyncOnCommit(true))
	if _, err := s.Prepare(ctx, "held", ""); err != nil {
		t.Fatal(err)
	}
	testHookCommitWalked = func() {
		if err := s.Remove(ctx, "held"); err != nil {
			t.Errorf("remove during commit: %v", err)
		}
	}
	err := s.Commit(ctx, "held-committed", "held")
	testHookCommitWalked = nil
	if !errdefs.IsNotFound(err) {
		t.Fatalf("commit of a key removed under it: %v, want NotFound", err)
	}

	// The same race left to the scheduler: the walk itself meets the
	// vanished directory some of the time.
	for i := range 50 {
		key := fmt.Sprintf("race-%d", i)
		m, err := s.Prepare(ctx, key, "")
		if err != nil {
			t.Fatal(err)
		}
		fill(t, m[0].Source, 300)
		var wg sync.WaitGroup
		var commitErr, removeErr error
		wg.Add(2)
		go func() { defer wg.Done(); commitErr = s.Commit(ctx, key+"-c", key) }()
		go func() { defer wg.Done(); removeErr = s.Remove(ctx, key) }()
		wg.Wait()
		switch {
		case commitErr == nil && !errdefs.IsNotFound(removeErr):
			t.Fatalf("round %d: commit won, remove of the active key said %v, want NotFound", i, removeErr)
		case commitErr != nil && !errdefs.IsNotFound(commitErr):
			t.Fatalf("round %d: commit lost with %v, want NotFound", i, commitErr)
		case commitErr != nil && removeErr != nil:
			t.Fatalf("round %d: both failed: %v; %v", i, commitErr, removeErr)
		}
	}
}

// TestParentRemovedWhilePlaced: once a Prepare's metadata is committed and
// before its directory is placed, another client removes the new snapshot
// and then its parent (TestStorm did). The Prepare must not fail with an
// unclassified error about the parent's vanished directory, must not
// remove a snapshot that took the key since, and nothing may be left
// behind.
func TestParentRemovedWhilePlaced(t *testing.T) {
	ctx, s := openTest(t, t.TempDir())
	if _, err := s.Prepare(ctx, "parent-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "parent", "parent-active"); err != nil {
		t.Fatal(err)
	}
	var removed sync.WaitGroup
	testHookCreateCommitted = func(key string) {
		testHookCreateCommitted = nil
		removed.Add(1)
		go func() { // waits for the placing, so it cannot run here
			defer removed.Done()
			if err := s.Remove(ctx, key); err != nil {
				t.Errorf("remove %s: %v", key, err)
			}
		}()
		for deadline := time.Now().Add(10 * time.Second); ; {
			err := s.Remove(ctx, "parent")
			if err == nil {
				break
			}
			if !errdefs.IsFailedPrecondition(err) || time.Now().After(deadline) {
				t.Errorf("remove parent: %v", err)
				return
			}
			time.Sleep(time.Millisecond)
		}
		// Another client takes the key again.
		if _, err := s.Prepare(ctx, key, ""); err != nil {
			t.Errorf("prepare %s again: %v", key, err)
		}
	}
	_, err := s.Prepare(ctx, "child", "parent")
	testHookCreateCommitted = nil
	removed.Wait()
	if err != nil && !errdefs.IsNotFound(err) {
		t.Fatalf("prepare whose snapshot and parent were removed meanwhile: %v, want success or NotFound", err)
	}
	if _, err := s.Stat(ctx, "child"); err != nil {
		t.Fatalf("the snapshot another client prepared under the key since: %v", err)
	}
	if err := s.Remove(ctx, "child"); err != nil {
		t.Fatal(err)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	s.deletions.wait()
	for _, dir := range []string{snapshotsDir, trashDir} {
		if entries, _ := os.ReadDir(filepath.Join(s.root, dir)); len(entries) != 0 {
			t.Errorf("%s left behind: %v", dir, entries)
		}
	}
}

// TestRemoveCleanupCloseConcurrently: Removes, Cleanups and Close run at
// once (containerd's GC and image pulls on a busy node). Waiting for the
// background deletions must not misuse anything (a reused WaitGroup used
// to panic the daemon here). Once Cleanup returns, nothing the metadata
// does not name is left outside the trash; once Close returns, the trash
// is empty too.
func TestRemoveCleanupCloseConcurrently(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	stop := time.Now().Add(2 * time.Second)
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(stop); i++ {
				key := fmt.Sprintf("w%d-%d", w, i)
				m, err := s.Prepare(ctx, key, "")
				if err != nil {
					t.Error(err)
					return
				}
				os.WriteFile(filepath.Join(m[0].Source, "f"), []byte("x"), 0o644)
				if err := s.Remove(ctx, key); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for range 2 {
		cleanupUntil(ctx, t, s, stop, &wg)
	}
	wg.Wait()
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	// Every key was removed, so nothing outside the trash may remain.
	for _, dir := range []string{snapshotsDir, flatDir, linksDir} {
		if left, _ := os.ReadDir(filepath.Join(root, dir)); len(left) != 0 {
			t.Fatalf("%d entries left in %s after Cleanup", len(left), dir)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(filepath.Join(root, trashDir)); len(left) != 0 {
		t.Fatalf("%d entries left in the trash after Close", len(left))
	}
}

// TestDeletionsBounded: removing hundreds of snapshots at once
// (containerd's GC after an image with many layers goes) deletes them with
// a few workers, not a goroutine each, and Close waits for all of them.
func TestDeletionsBounded(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	// Each layer takes longer to delete than to Remove, so that a
	// goroutine per Remove would pile up.
	const n, files = 150, 200
	for i := range n {
		m, err := s.Prepare(ctx, fmt.Sprint(i), "")
		if err != nil {
			t.Fatal(err)
		}
		fill(t, m[0].Source, files)
	}
	peak := 0
	for i := range n {
		if err := s.Remove(ctx, fmt.Sprint(i)); err != nil {
			t.Fatal(err)
		}
		peak = max(peak, deleting())
	}
	t.Logf("at most %d deletions at once", peak)
	if peak > deleteWorkers {
		t.Errorf("%d removals ran %d deletions at once, want at most %d", n, peak, deleteWorkers)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(filepath.Join(root, trashDir)); len(left) != 0 {
		t.Fatalf("%d entries left in the trash after Close", len(left))
	}
}

// TestLinkLayersConcurrently: the first mounts of one deep stack, made at
// once (two replicas of a 400-layer image starting together), all make its
// short links without failing on each other's.
func TestLinkLayersConcurrently(t *testing.T) {
	root := t.TempDir()
	_, s := openTest(t, root)
	ids := make([]string, 400)
	for i := range ids {
		ids[i] = fmt.Sprint(i + 1)
	}
	for round := range 10 {
		s.linked.Clear()
		links := filepath.Join(root, linksDir)
		if err := os.RemoveAll(links); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(links, 0o700); err != nil {
			t.Fatal(err)
		}
		start := make(chan struct{})
		errs := make(chan error, 8)
		for range cap(errs) {
			go func() {
				<-start
				errs <- s.linkLayers(ids)
			}()
		}
		close(start)
		for range cap(errs) {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		for _, id := range ids {
			target, err := os.Readlink(s.linkPath(id))
			if want := filepath.Join("..", snapshotsDir, id, "fs"); err != nil || target != want {
				t.Fatalf("link of %s: %q, %v; want %q", id, target, err, want)
			}
		}
		if entries, _ := os.ReadDir(links); len(entries) != len(ids) {
			t.Fatalf("round %d: %d entries in %s, want %d links", round, len(entries), links, len(ids))
		}
	}
}

// TestWalkEmptyRoot: a root with no snapshots lists none, without error,
// as a client listing them expects; an error of the walk function still
// comes back.
func TestWalkEmptyRoot(t *testing.T) {
	ctx, s := openTest(t, t.TempDir())
	if err := s.Walk(ctx, func(context.Context, snapshots.Info) error {
		t.Error("walked a snapshot in an empty root")
		return nil
	}); err != nil {
		t.Fatalf("walk of an empty root: %v", err)
	}
	if _, err := s.Prepare(ctx, "one", ""); err != nil {
		t.Fatal(err)
	}
	err := s.Walk(ctx, func(context.Context, snapshots.Info) error { return errdefs.ErrNotFound })
	if !errdefs.IsNotFound(err) {
		t.Fatalf("the walk function's NotFound was lost: %v", err)
	}
}

// deleting counts the goroutines in os.RemoveAll now: the ones emptying
// the trash (other goroutines come and go with the runtime and the tests
// before).
func deleting() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "\nos.RemoveAll(")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// TestCleanupCreatesConcurrently: Cleanup reads the metadata in a read
// transaction, so creates commit and place their directories while it runs,
// and commits make links for the next layer's mounts. Nothing a snapshot
// owns may be taken for an orphan, and no snapshot may be called missing:
// after the storm every snapshot has its directory, each layer its link,
// and every active one mounts with its parents.
func TestCleanupCreatesConcurrently(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root)
	stop := time.Now().Add(2 * time.Second)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			parent := ""
			for i := 0; time.Now().Before(stop); i++ {
				key := fmt.Sprintf("w%d-%d", w, i)
				if _, err := s.Prepare(ctx, key, parent); err != nil {
					t.Error(err)
					return
				}
				if i%2 == 1 { // every other one stays active
					continue
				}
				if err := s.Commit(ctx, key+"-c", key); err != nil {
					t.Error(err)
					return
				}
				parent = key + "-c"
				if _, err := s.View(ctx, key+"-v", parent); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	cleanupUntil(ctx, t, s, stop, &wg)
	wg.Wait()
	if m := s.Missing(); len(m) != 0 {
		t.Fatalf("snapshots called missing while they were made: %v", m)
	}
	var keys []string
	if err := s.Walk(ctx, func(ctx context.Context, info snapshots.Info) error {
		keys = append(keys, info.Name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, key := range keys {
		info, err := s.Stat(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		if info.Kind == snapshots.KindCommitted {
			continue
		}
		m, err := s.Mounts(ctx, key)
		if err != nil {
			t.Fatalf("mounts of %s: %v", key, err)
		}
		target := t.TempDir()
		if err := m[0].Mount(target); err != nil {
			t.Fatalf("mount %s: %v", key, err)
		}
		unmount(target)
	}
	if len(keys) < 20 {
		t.Fatalf("only %d snapshots made: the test did not race anything", len(keys))
	}
}

// cleanupUntil calls Cleanup over and over until stop, in a goroutine wg
// waits for.
func cleanupUntil(ctx context.Context, t *testing.T, s *Snapshotter, stop time.Time, wg *sync.WaitGroup) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		for time.Now().Before(stop) {
			if err := s.Cleanup(ctx); err != nil {
				t.Error(err)
				return
			}
		}
	}()
}
