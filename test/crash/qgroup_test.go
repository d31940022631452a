package crash

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// qgroupKills is how many times TestLimitCrashQgroup kills the daemon.
const qgroupKills = 12

// TestLimitCrashQgroup is TestLimitCrash on a btrfs root with qgroups
// enabled, where a limited snapshot is a subvolume with a qgroup limit: it
// SIGKILLs the real daemon in the middle of Prepares (making the
// subvolume, limiting it) and Removes, and checks after every restart
// that the subvolumes under snapshots/ are exactly the limited actives'
// (each answers Usage); at the end, with everything removed, no
// subvolume and no qgroup but the filesystem's own is left.
func TestLimitCrashQgroup(t *testing.T) {
	require.Root(t, "btrfs quotas need a loop-mounted btrfs")
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	ctx := namespaces.WithNamespace(context.Background(), "crash")
	mnt := loopfs.Mount(t, loopfs.Btrfs)
	loopfs.EnableQuotas(t, mnt, loopfs.Qgroups)
	root := filepath.Join(mnt, "root")
	d := daemon.Start(t, root, "mode = \"overlay\"\n")
	if m := snapshotter.ProbeRootLimits(snapshotter.ModeOverlay, root, snapshotter.LimitAuto); m.Backend != snapshotter.LimitQgroup {
		t.Fatalf("limits on a btrfs root with qgroups: %+v", m)
	}
	limit := snapshots.WithLabels(map[string]string{snapshotter.LabelMaxSize: strconv.Itoa(snapshotter.MinMaxSize)})
	if _, err := d.Client().Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := d.Client().Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	live := killDuringLimited(ctx, t, d, rng, qgroupKills, 20*time.Millisecond,
		func(int) []snapshots.Opt { return []snapshots.Opt{limit} },
		func() []string { return checkSubvolumes(ctx, t, d, root) })
	for _, key := range live {
		if err := d.Client().Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Client().(snapshots.Cleaner).Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(); err != nil { // waits for the trash
		t.Fatal(err)
	}
	if left := subvolumes(t, root, "snapshots", "trash"); len(left) != 0 {
		t.Fatalf("subvolumes left after everything was removed: %v", left)
	}
	loopfs.SubvolumeSync(t, mnt)
	if ids := loopfs.QgroupIDs(t, mnt); !slices.Equal(ids, []string{"0/5"}) {
		t.Fatalf("qgroups left after everything was removed: %v", ids)
	}
}

// checkSubvolumes checks the invariant and returns the limited actives.
func checkSubvolumes(ctx context.Context, t *testing.T, d *daemon.Daemon, root string) []string {
	t.Helper()
	limited := limitedActives(ctx, t, d)
	// Only snapshots/: the trash is emptied in the background.
	if subs := subvolumes(t, root, "snapshots"); len(subs) != len(limited) {
		t.Fatalf("%d subvolumes under snapshots/ (%v) for %d limited actives (%v)\n%s", len(subs), subs, len(limited), limited, d.Log())
	}
	return limited
}

// subvolumes lists the subvolumes in root's dirs.
func subvolumes(t *testing.T, root string, dirs ...string) []string {
	t.Helper()
	var out []string
	for _, dir := range dirs {
		entries, err := os.ReadDir(filepath.Join(root, dir))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			var st unix.Stat_t
			p := filepath.Join(root, dir, e.Name())
			if err := unix.Lstat(p, &st); err == nil && st.Ino == 256 && st.Mode&unix.S_IFMT == unix.S_IFDIR {
				out = append(out, filepath.Join(dir, e.Name()))
			}
		}
	}
	return out
}
