package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// bigLayerFiles makes Commit's usage walk long enough to see who waits.
const bigLayerFiles = 10000

// TestCommitDoesNotBlockPrepare: a Prepare issued while a big layer is being
// committed returns before the Commit does. For overclone this is shown
// without timing: the Commit is held between its walk and its transaction
// until the Prepare has returned. containerd's built-in overlayfs
// snapshotter, measured side by side, makes the Prepare wait for the walk.
func TestCommitDoesNotBlockPrepare(t *testing.T) {
	ctx, ours, builtin := openSideBySide(t)

	prepared := make(chan struct{})
	testHookCommitWalked = func() {
		select {
		case <-prepared:
		case <-time.After(time.Minute):
			t.Error("the Prepare never returned while the Commit was held after its walk")
		}
	}
	defer func() { testHookCommitWalked = nil }()

	for _, tc := range []struct {
		name string
		sn   snapshots.Snapshotter
	}{{"overclone", ours}, {"builtin-overlayfs", builtin}} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := tc.sn.Prepare(ctx, "big", ""); err != nil {
				t.Fatal(err)
			}
			fill(t, bindSource(ctx, t, tc.sn, "big"), bigLayerFiles)

			var (
				wg         sync.WaitGroup
				commitDone time.Time
				commitErr  error
			)
			start := time.Now()
			wg.Add(1)
			go func() {
				defer wg.Done()
				commitErr = tc.sn.Commit(ctx, "big-committed", "big")
				commitDone = time.Now()
			}()
			// Let the Commit start its walk before the Prepare arrives.
			time.Sleep(5 * time.Millisecond)
			prepareStart := time.Now()
			if _, err := tc.sn.Prepare(ctx, "small", ""); err != nil {
				t.Fatal(err)
			}
			prepareDone := time.Now()
			if tc.name == "overclone" {
				close(prepared)
			}
			wg.Wait()
			if commitErr != nil {
				t.Fatal(commitErr)
			}
			t.Logf("%s: commit of %d files took %v; a Prepare issued during it took %v",
				tc.name, bigLayerFiles, commitDone.Sub(start), prepareDone.Sub(prepareStart))
		})
	}
}

func fill(t *testing.T, dir string, n int) {
	t.Helper()
	for i := 0; i < n; i += 100 {
		sub := filepath.Join(dir, fmt.Sprintf("d%03d", i/100))
		if err := os.Mkdir(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		for j := i; j < i+100 && j < n; j++ {
			if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%05d", j)), []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func bindSource(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, key string) string {
	t.Helper()
	m, err := sn.Mounts(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	return m[0].Source
}
