package snapshotter

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// TestGroupCommit: writes that arrive while one commits share the next
// transaction, and one that fails in the group (a key already taken)
// fails alone: the others' snapshots are all there, and only one of the
// callers racing for the shared key has it.
func TestGroupCommit(t *testing.T) {
	ctx, s := openTest(t, t.TempDir(), WithSyncOnCommit(true))
	const callers = 24
	var (
		mu      sync.Mutex
		batches []int
		first   = make(chan struct{})
		release = make(chan struct{})
	)
	testHookBatch = func(n int) {
		mu.Lock()
		batches = append(batches, n)
		isFirst := len(batches) == 1
		mu.Unlock()
		if isFirst {
			close(first)
			<-release // hold the disk while the others queue
		}
	}
	defer func() { testHookBatch = nil }()

	go func() {
		if _, err := s.Prepare(ctx, "first", ""); err != nil {
			t.Error(err)
		}
	}()
	<-first
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := fmt.Sprint("own-", i)
			if i%4 == 0 {
				key = "shared" // six callers race for one key
			}
			_, errs[i] = s.Prepare(ctx, key, "")
		}()
	}
	// Every caller's write queued behind the held commit.
	queued := func() int {
		s.batch.mu.Lock()
		defer s.batch.mu.Unlock()
		return len(s.batch.pending)
	}
	for deadline := time.Now().Add(30 * time.Second); queued() < callers; {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d writes queued", queued(), callers)
		}
		time.Sleep(time.Millisecond)
	}
	close(release)
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	if len(batches) != 2 || batches[1] != callers {
		t.Fatalf("batches %v, want [1 %d]: the queued writes did not share a transaction", batches, callers)
	}
	var shared int
	for i, err := range errs {
		switch {
		case i%4 != 0 && err != nil:
			t.Errorf("own-%d: %v", i, err)
		case i%4 == 0 && err == nil:
			shared++
		case i%4 == 0 && !errdefs.IsAlreadyExists(err):
			t.Errorf("a caller that lost the race for the shared key: %v, want AlreadyExists", err)
		}
	}
	if shared != 1 {
		t.Errorf("%d callers got the shared key, want 1", shared)
	}
	for i := range callers {
		key := fmt.Sprint("own-", i)
		if i%4 == 0 {
			key = "shared"
		}
		if _, err := s.Mounts(ctx, key); err != nil {
			t.Errorf("%s after the group commit: %v", key, err)
		}
	}
}
