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
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
)

// bigLayerFiles makes Commit's usage walk long enough to see who waits.
const bigLayerFiles = 20000

// TestCommitDoesNotBlockPrepare: a Prepare issued while a big layer is being
// committed returns before the Commit does. containerd's built-in overlayfs
// snapshotter, measured side by side, makes the Prepare wait for the walk.
func TestCommitDoesNotBlockPrepare(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	ours, err := New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer ours.Close()
	builtin, err := overlay.NewSnapshotter(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer builtin.Close()

	for _, tc := range []struct {
		name string
		sn   snapshots.Snapshotter
		dir  func(key string) string
	}{
		{"overclone", ours, func(key string) string { return bindSource(ctx, t, ours, key) }},
		{"builtin-overlayfs", builtin, func(key string) string { return bindSource(ctx, t, builtin, key) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := tc.sn.Prepare(ctx, "big", ""); err != nil {
				t.Fatal(err)
			}
			fill(t, tc.dir("big"), bigLayerFiles)

			var (
				wg                      sync.WaitGroup
				commitDone, prepareDone time.Time
				commitErr               error
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
			prepareDone = time.Now()
			wg.Wait()
			if commitErr != nil {
				t.Fatal(commitErr)
			}
			commit, prepare := commitDone.Sub(start), prepareDone.Sub(prepareStart)
			t.Logf("%s: commit of %d files took %v; a Prepare issued during it took %v", tc.name, bigLayerFiles, commit, prepare)
			if tc.sn == snapshots.Snapshotter(ours) && !prepareDone.Before(commitDone) {
				t.Fatalf("Prepare (%v) waited for the Commit (%v)", prepare, commit)
			}
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
