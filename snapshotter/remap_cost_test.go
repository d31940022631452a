package snapshotter

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"

	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/remap"
	"github.com/overclone/overclone/test/require"
)

// TestRemapCopyCost measures, on loop xfs, what a user-namespaced
// container costs where the kernel has no idmapped layers: overclone's
// shifted reflink copy against containerd's built-in overlayfs with
// slow_chown, where containerd's client prepares a snapshot on the image,
// chowns every file through its overlay mount (a copy-up of each: the
// data is copied) and commits it, then prepares the container on that.
// Further containers with a mapping met before find the copy made on both
// sides (the built-in's committed, overclone's in ROOT/remap); they are
// set against containers without a mapping on the same snapshotter,
// interleaved, so that a mapped Prepare's own cost shows (it was the
// metadata file's growth: dbtail.go).
// It runs in every `make test` (about 4 s): it asserts nothing but that
// every path works, and logs the medians and ratios (-v shows them).
func TestRemapCopyCost(t *testing.T) {
	require.Root(t, "mounts and chowns")
	const (
		layers   = 4
		files    = 500 // per layer
		fileSize = 32 << 10
		rounds   = 5  // first containers, a mapping each
		further  = 31 // further containers of each kind
	)
	base := loopfs.MountSize(t, loopfs.XFS, 4<<30)
	ctx, ours := openTest(t, filepath.Join(base, "ours"), WithMode(ModeOverlay))
	ours.idmapped = false // as on a kernel without idmapped overlay layers
	theirs, err := overlay.NewSnapshotter(filepath.Join(base, "builtin"), overlay.AsynchronousRemove, overlay.WithSlowChown)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { theirs.Close() })

	data := bytes.Repeat([]byte("overclone"), fileSize/9)
	for _, sn := range []snapshots.Snapshotter{ours, theirs} {
		parent := ""
		for l := 0; l < layers; l++ {
			name := fmt.Sprintf("img-%d", l)
			ms, err := sn.Prepare(ctx, name+"-active", parent)
			if err != nil {
				t.Fatal(err)
			}
			err = mount.WithTempMount(ctx, ms, func(root string) error {
				dir := filepath.Join(root, fmt.Sprintf("layer%d", l))
				if err := os.Mkdir(dir, 0o755); err != nil {
					return err
				}
				for i := 0; i < files; i++ {
					if err := os.WriteFile(filepath.Join(dir, fmt.Sprint(i)), data, 0o644); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := sn.Commit(ctx, name, name+"-active"); err != nil {
				t.Fatal(err)
			}
			parent = name
		}
	}
	top := fmt.Sprintf("img-%d", layers-1)
	if err := syncFilesystem(base); err != nil {
		t.Fatal(err)
	}

	// start mounts a container's snapshot and unmounts it, as a
	// container start and stop do.
	start := func(ms []mount.Mount) {
		if err := mount.WithTempMount(ctx, ms, func(string) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	times := map[string][]time.Duration{}
	timed := func(what string, fn func()) {
		t0 := time.Now()
		fn()
		times[what] = append(times[what], time.Since(t0))
	}
	for r := 0; r < rounds; r++ {
		// A mapping per round, as Kubernetes gives each pod its own.
		host := remap.HostRoot + r*65536
		m := fmt.Sprintf("0:%d:65536", host)
		labels := snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotUIDMapping: m, snapshots.LabelSnapshotGIDMapping: m})
		for _, sn := range []string{"overclone", "builtin"} {
			switch sn {
			case "overclone":
				timed("overclone userns first", func() {
					ms, err := ours.Prepare(ctx, fmt.Sprintf("u%d-0", r), top, labels)
					if err != nil {
						t.Fatal(err)
					}
					start(ms)
				})
			case "builtin":
				rsn := fmt.Sprintf("remapped-%d", r)
				timed("built-in slow_chown first", func() {
					// containerd's client: client/snapshotter_opts_unix.go
					// resolveSnapshotOptions and remapRootFS.
					ms, err := theirs.Prepare(ctx, rsn+"-remap", top)
					if err != nil {
						t.Fatal(err)
					}
					err = mount.WithTempMount(ctx, ms, func(root string) error {
						return filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
							if err != nil {
								return err
							}
							st := fi.Sys().(*syscall.Stat_t)
							if err := os.Lchown(p, host+int(st.Uid), host+int(st.Gid)); err != nil {
								return err
							}
							if fi.Mode()&os.ModeSymlink == 0 && fi.Mode()&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky) != 0 {
								return os.Chmod(p, fi.Mode())
							}
							return nil
						})
					})
					if err != nil {
						t.Fatal(err)
					}
					if err := theirs.Commit(ctx, rsn, rsn+"-remap"); err != nil {
						t.Fatal(err)
					}
					ms, err = theirs.Prepare(ctx, fmt.Sprintf("u%d-0", r), rsn, labels)
					if err != nil {
						t.Fatal(err)
					}
					start(ms)
				})
			}
		}
	}

	// Further containers with a mapping met before (round 0's), against
	// containers without one, interleaved so that both see the same
	// machine: the copy is there on both sides, so this is the cost of a
	// Prepare with the labels and a mount on the copy.
	m0 := fmt.Sprintf("0:%d:65536", remap.HostRoot)
	labels0 := snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotUIDMapping: m0, snapshots.LabelSnapshotGIDMapping: m0})
	for i := 0; i < further; i++ {
		for j, what := range []string{"overclone userns same mapping", "overclone plain", "built-in slow_chown same mapping", "built-in plain"} {
			sn, parent := snapshots.Snapshotter(ours), top
			var opts []snapshots.Opt
			switch what {
			case "overclone userns same mapping":
				opts = append(opts, labels0)
			case "built-in slow_chown same mapping":
				// containerd's client finds its copy by Stat first.
				sn, parent = theirs, "remapped-0"
				opts = append(opts, labels0)
			case "built-in plain":
				sn = theirs
			}
			timed(what, func() {
				if what == "built-in slow_chown same mapping" {
					if _, err := theirs.Stat(ctx, parent); err != nil {
						t.Fatal(err)
					}
				}
				ms, err := sn.Prepare(ctx, fmt.Sprintf("f%d-%d", i, j), parent, opts...)
				if err != nil {
					t.Fatal(err)
				}
				start(ms)
			})
		}
	}
	med := func(what string) time.Duration {
		ds := append([]time.Duration(nil), times[what]...)
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		return ds[len(ds)/2]
	}
	for _, what := range []string{"overclone userns first", "overclone userns same mapping", "overclone plain",
		"built-in slow_chown first", "built-in slow_chown same mapping", "built-in plain"} {
		t.Logf("%-34s median %v of %v", what, med(what), times[what])
	}
	ratio := func(a, b string) float64 { return float64(med(a)) / float64(med(b)) }
	t.Logf("image: %d layers x %d files x %d KiB on xfs (reflink)", layers, files, fileSize>>10)
	t.Logf("first userns container, overclone / built-in slow_chown: %.3fx (target <= 0.2x)", ratio("overclone userns first", "built-in slow_chown first"))
	t.Logf("same mapping again, overclone / overclone without a mapping: %.2fx (target <= 1.1x)", ratio("overclone userns same mapping", "overclone plain"))
	t.Logf("same mapping again, built-in / built-in without a mapping: %.2fx", ratio("built-in slow_chown same mapping", "built-in plain"))
}
