package crash

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
	"golang.org/x/sys/unix"
)

// limitKills is how many times TestLimitCrash kills the daemon: each kill
// lands at a random point of a Prepare (making, formatting, mounting and
// moving an image) or a Remove (unmounting it), and a restart costs about
// 0.2 s here.
const limitKills = 16

// TestLimitCrash SIGKILLs the real daemon in the middle of Prepares and
// Removes of size-limited snapshots (labelled, and limited by
// default_max_size from the daemon's pool of ready images) and checks
// after every restart that
// what the size limits hold is exactly what the metadata names: every
// limited active's image is mounted (its Usage, read from the image,
// answers) and no other image is mounted or holds a loop device. At the
// end, with everything removed and Cleanup run, nothing is left.
func TestLimitCrash(t *testing.T) {
	require.Root(t, "size limits mount loop devices")
	if m := snapshotter.ProbeLimits(snapshotter.ModeOverlay); !m.OK {
		require.Skipf(t, "size limits unavailable: %s", m.How)
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	ctx := namespaces.WithNamespace(context.Background(), "crash")
	root := filepath.Join(loopfs.Mount(t, loopfs.Ext4), "root")
	// Half the Prepares carry a label, half take default_max_size; both
	// limits are served by images of one size class (64 MiB) from the
	// pool the daemon keeps ready, each held to its own limit by its
	// reserve (kills land while the pool refills too), but the first
	// labelled one, made in its call.
	const defaultSize, labelled = 40 << 20, 48 << 20
	d := daemon.Start(t, root, fmt.Sprintf("mode = \"overlay\"\ndefault_max_size = %d\n", defaultSize))
	limit := snapshots.WithLabels(map[string]string{snapshotter.LabelMaxSize: strconv.Itoa(labelled)})

	// The image's layer is no container: no default limit.
	if _, err := d.Client().Prepare(ctx, "base-active", "", snapshots.WithLabels(map[string]string{snapshotter.LabelMaxSize: "0"})); err != nil {
		t.Fatal(err)
	}
	if err := d.Client().Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	opts := func(i int) []snapshots.Opt {
		if i%2 == 1 {
			return nil // the default, from the pool
		}
		return []snapshots.Opt{limit}
	}
	live := killDuringLimited(ctx, t, d, rng, limitKills, 40*time.Millisecond, opts,
		func() []string {
			live := checkImages(ctx, t, d, root)
			imagesHeldTo(t, root, labelled)
			return live
		})
	for _, key := range live {
		if err := d.Client().Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Client().(snapshots.Cleaner).Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if left := checkImages(ctx, t, d, root); len(left) != 0 {
		t.Fatalf("limited snapshots left after removing all: %v", left)
	}
	if err := d.Stop(); err != nil { // waits for the trash, lets go of the pool
		t.Fatal(err)
	}
	if left := imageMounts(t, root); len(left) != 0 {
		t.Fatalf("mounts left after everything was removed: %v", left)
	}
	waitNoLoops(t, root)
	if pooled, _ := filepath.Glob(filepath.Join(root, "images", "pool-*")); len(pooled) != 0 {
		t.Fatalf("pooled images left after a clean stop: %v", pooled)
	}
}

// imagesHeldTo checks that no image mounted under root can hold more than
// limit: what its filesystem uses and what it can still hand out (its free
// blocks less its reserve: statfs's f_bavail) come to at most limit.
func imagesHeldTo(t *testing.T, root string, limit int64) {
	t.Helper()
	for _, dir := range imageMounts(t, root) {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		if held := int64(st.Blocks-st.Bfree+st.Bavail) * st.Bsize; held > limit {
			t.Fatalf("the image on %s can hold %d bytes (%d used), past the largest limit %d", dir, held, int64(st.Blocks-st.Bfree)*st.Bsize, limit)
		}
	}
}

// checkImages checks the invariant and returns the limited actives.
func checkImages(ctx context.Context, t *testing.T, d *daemon.Daemon, root string) []string {
	t.Helper()
	limited := limitedActives(ctx, t, d)
	if mounts := imageMounts(t, root); len(mounts) != len(limited) {
		t.Fatalf("%d images mounted (%v) for %d limited actives (%v)\n%s", len(mounts), mounts, len(limited), limited, d.Log())
	}
	return limited
}

// killDuringLimited SIGKILLs d kills times, each at a random point (up to
// maxDelay in) of a Prepare of a new key on "base" with opts(i), or, once
// more than one is live, now and then of a Remove of a live one; after
// each restart check checks the invariant and returns the live limited
// actives, which killDuringLimited returns after the last.
func killDuringLimited(ctx context.Context, t *testing.T, d *daemon.Daemon, rng *rand.Rand, kills int, maxDelay time.Duration, opts func(i int) []snapshots.Opt, check func() []string) []string {
	t.Helper()
	var live []string
	for i := range kills {
		sn := d.Client()
		var call func() error
		if len(live) > 1 && rng.IntN(3) == 0 {
			key := live[rng.IntN(len(live))]
			call = func() error { return sn.Remove(ctx, key) }
		} else {
			key := "c" + strconv.Itoa(i)
			o := opts(i)
			call = func() error { _, err := sn.Prepare(ctx, key, "base", o...); return err }
		}
		done := make(chan error, 1)
		go func() { done <- call() }()
		time.Sleep(time.Duration(rng.IntN(int(maxDelay/time.Microsecond))) * time.Microsecond)
		if err := d.Kill(); err != nil {
			t.Fatal(err)
		}
		<-done // whatever it says: the check asks the restarted daemon
		if err := d.Restart(); err != nil {
			t.Fatal(err)
		}
		live = check()
	}
	return live
}

// limitedActives lists the actives with a size limit, each of which must
// answer Usage.
func limitedActives(ctx context.Context, t *testing.T, d *daemon.Daemon) []string {
	t.Helper()
	var limited []string
	if err := d.Client().Walk(ctx, func(ctx context.Context, info snapshots.Info) error {
		if info.Kind == snapshots.KindActive && info.Labels[snapshotter.LabelMaxSize] != "" {
			limited = append(limited, info.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, key := range limited {
		if _, err := d.Client().Usage(ctx, key); err != nil {
			t.Fatalf("limited %q after a kill: Usage: %v\n%s", key, err, d.Log())
		}
	}
	return limited
}

// imageMounts lists the mounts under root.
func imageMounts(t *testing.T, root string) []string {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], root+"/") {
			out = append(out, f[4])
		}
	}
	return out
}

// waitNoLoops waits for the loop devices backed by files under root to
// clear. The kernel clears an autoclear loop device in a worker after its
// last user lets go (since 5.17), so it may still be there right after the
// unmount; 10 s is far past that, and a leaked device never goes.
func waitNoLoops(t *testing.T, root string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []string
		loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, l := range loops {
			if b, err := os.ReadFile(l); err == nil && strings.HasPrefix(string(b), root+"/") {
				left = append(left, fmt.Sprintf("%s: %s", filepath.Base(filepath.Dir(filepath.Dir(l))), strings.TrimSpace(string(b))))
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("loop devices left: %v", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
