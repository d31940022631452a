package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"golang.org/x/sys/unix"
)

// stackDepths are the image depths compared; the snapshotters keep their
// snapshots from one depth to the next, so ids grow as on a real node.
var stackDepths = []int{50, 128, 256, 500, 1000}

// builtinMaxDepth is the deepest stack containerd's built-in snapshotter
// mounts: the kernel's OVL_MAX_STACK. Past it the kernel refuses ("too many
// lower directories") or, as at 1000 layers, containerd's compacted option
// string is already over a page ("mount options is too long").
const builtinMaxDepth = 500

// TestDeepStacks builds images of 50 to 1000 layers on overclone and on
// containerd's built-in overlayfs snapshotter, side by side, mounts a view
// of each with containerd's core/mount, and checks the merged view. Each
// layer adds a file and rewrites /top; every tenth deletes the file of the
// layer below it with a whiteout. Both a view and a container (an active
// snapshot, whose upperdir= and workdir= take room in the same page) are
// mounted. overclone must mount every depth; the built-in, the reference,
// must mount every depth up to builtinMaxDepth and fail past it, as
// measured with containerd 1.6 and 2.4 (so a 1000-layer pass by overclone
// is one the built-in cannot make).
func TestDeepStacks(t *testing.T) {
	ctx, ours, builtin := openSideBySide(t)

	for _, depth := range stackDepths {
		for _, tc := range []struct {
			name string
			sn   snapshots.Snapshotter
		}{{"overclone", ours}, {"builtin-overlayfs", builtin}} {
			t.Run(fmt.Sprintf("%d/%s", depth, tc.name), func(t *testing.T) {
				top := buildChain(ctx, t, tc.sn, fmt.Sprintf("d%d", depth), depth)
				for _, kind := range []snapshots.Kind{snapshots.KindView, snapshots.KindActive} {
					err := checkChain(ctx, t, tc.sn, kind, top, depth)
					if tc.name == "overclone" {
						if err != nil {
							t.Fatalf("%s of %d layers: %v", kind, depth, err)
						}
						continue
					}
					switch {
					case depth <= builtinMaxDepth && err != nil:
						t.Errorf("built-in overlayfs: %s of %d layers: %v", kind, depth, err)
					case depth > builtinMaxDepth && err == nil:
						t.Errorf("built-in overlayfs mounted a %s of %d layers, past the kernel's %d lowers", kind, depth, builtinMaxDepth)
					case err != nil:
						t.Logf("built-in overlayfs: %s of %d layers fails, as it must: %v", kind, depth, err)
					}
				}
			})
		}
	}
}

// buildChain commits depth layers, writing each straight into its upper
// directory as containerd's diff applier does, and returns the top's name.
func buildChain(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, prefix string, depth int) string {
	t.Helper()
	parent := ""
	for i := 0; i < depth; i++ {
		key := fmt.Sprintf("%s-layer-%d-active", prefix, i)
		mounts, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		upper := upperDir(mounts)
		write := func(name, content string) {
			if err := os.WriteFile(filepath.Join(upper, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		write(fmt.Sprintf("layer-%d", i), fmt.Sprint(i))
		write("top", fmt.Sprint(i))
		if i%10 == 9 {
			// An overlay whiteout: a 0/0 character device.
			if err := unix.Mknod(filepath.Join(upper, fmt.Sprintf("layer-%d", i-1)), unix.S_IFCHR, 0); err != nil {
				t.Fatal(err)
			}
		}
		parent = fmt.Sprintf("%s-layer-%d", prefix, i)
		if err := sn.Commit(ctx, parent, key); err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
	}
	return parent
}

func upperDir(mounts []mount.Mount) string {
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v
		}
	}
	return mounts[0].Source
}

// checkChain mounts a view or an active snapshot of top and checks what a
// depth-layer chain from buildChain must show.
func checkChain(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, kind snapshots.Kind, top string, depth int) error {
	key := top + "-" + kind.String()
	create := sn.View
	if kind == snapshots.KindActive {
		create = sn.Prepare
	}
	mounts, err := create(ctx, key, top)
	if err != nil {
		return err
	}
	defer sn.Remove(ctx, key)
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		return err
	}
	defer mount.UnmountAll(target, 0)
	if got, err := os.ReadFile(filepath.Join(target, "top")); err != nil || string(got) != fmt.Sprint(depth-1) {
		return fmt.Errorf("/top is %q (%v), want %d", got, err, depth-1)
	}
	entries, err := os.ReadDir(target)
	if err != nil {
		return err
	}
	want := 1 // top
	for i := 0; i < depth; i++ {
		name := filepath.Join(target, fmt.Sprintf("layer-%d", i))
		_, err := os.Stat(name)
		deleted := i%10 == 8 && i+1 < depth
		switch {
		case deleted && err == nil:
			return fmt.Errorf("layer-%d was whited out but is visible", i)
		case !deleted && err != nil:
			return fmt.Errorf("layer-%d: %v", i, err)
		case !deleted:
			want++
		}
	}
	if len(entries) != want {
		return fmt.Errorf("view lists %d entries, want %d", len(entries), want)
	}
	return nil
}
