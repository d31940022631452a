package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// bigLayerFiles makes Commit's usage walk long enough to see who waits.
const bigLayerFiles = 10000

// TestCommitDoesNotBlockPrepare: a Prepare issued while a big layer is being
// committed returns before the Commit is recorded. For overclone this is
// shown without timing: the Commit is held between its walk and its
// transaction until the Prepare has returned. containerd's built-in
// overlayfs snapshotter, measured side by side, walks inside its write
// transaction: a Prepare issued once the walk is seen opening the layer's
// directories returns only after the Commit is recorded.
func TestCommitDoesNotBlockPrepare(t *testing.T) {
	ctx, ours, builtin := openSideBySide(t)

	for _, tc := range []struct {
		name  string
		sn    snapshots.Snapshotter
		waits bool // whether the Prepare waits for the Commit
	}{{"overclone", ours, false}, {"builtin-overlayfs", builtin, true}} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := tc.sn.Prepare(ctx, "big", ""); err != nil {
				t.Fatal(err)
			}
			dir := bindSource(ctx, t, tc.sn, "big")
			fill(t, dir, bigLayerFiles)
			walking := watchWalk(t, dir)

			prepared := make(chan struct{})
			if !tc.waits {
				testHookCommitWalked = func() {
					select {
					case <-prepared:
					case <-time.After(time.Minute):
						t.Error("the Prepare never returned while the Commit was held after its walk")
					}
				}
				defer func() { testHookCommitWalked = nil }()
			}

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
			if tc.waits {
				// The built-in has no hook: issue the Prepare once the
				// walk, inside its transaction, is seen.
				select {
				case <-walking:
				case <-time.After(time.Minute):
					t.Fatal("the Commit never walked the layer's directories")
				}
			} else {
				// Let the Commit start its walk before the Prepare arrives.
				time.Sleep(5 * time.Millisecond)
			}
			prepareStart := time.Now()
			if _, err := tc.sn.Prepare(ctx, "small", ""); err != nil {
				t.Fatal(err)
			}
			prepareDone := time.Now()
			_, statErr := tc.sn.Stat(ctx, "big-committed")
			close(prepared)
			wg.Wait()
			if commitErr != nil {
				t.Fatal(commitErr)
			}
			switch recorded := statErr == nil; {
			case statErr != nil && !errdefs.IsNotFound(statErr):
				t.Fatalf("stat the committed layer: %v", statErr)
			case tc.waits && !recorded:
				t.Errorf("the built-in's Prepare returned before its Commit was recorded: it no longer waits for the walk, and this test no longer compares anything")
			case !tc.waits && recorded:
				t.Errorf("overclone's Prepare returned only after the Commit was recorded: it waited for the Commit")
			}
			t.Logf("%s: commit of %d files took %v; a Prepare issued during it took %v",
				tc.name, bigLayerFiles, commitDone.Sub(start), prepareDone.Sub(prepareStart))
		})
	}
}

// watchWalk returns a channel closed when something opens a directory
// inside dir: a usage walk going down the layer.
func watchWalk(t *testing.T, dir string) <-chan struct{} {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatalf("inotify: %v", err)
	}
	f := os.NewFile(uintptr(fd), "inotify")
	t.Cleanup(func() { f.Close() })
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_OPEN|unix.IN_ONLYDIR); err != nil {
		t.Fatalf("watch %s: %v", dir, err)
	}
	walking := make(chan struct{})
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return // closed when the test ends
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				if ev.Mask&unix.IN_ISDIR != 0 && ev.Len > 0 {
					close(walking)
					return
				}
				off += unix.SizeofInotifyEvent + int(ev.Len)
			}
		}
	}()
	return walking
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
