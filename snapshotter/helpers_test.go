package snapshotter

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"

	"golang.org/x/sys/unix"
)

func mountOverlay(base, target string) error {
	opts := "lowerdir=" + filepath.Join(base, "lower") + ",upperdir=" + filepath.Join(base, "upper") + ",workdir=" + filepath.Join(base, "work")
	return unix.Mount("overlay", target, "overlay", 0, opts)
}

func unmount(target string) { unix.Unmount(target, unix.MNT_DETACH) }

// openTest opens a snapshotter on root for a test, closed when it ends.
func openTest(t *testing.T, root string, opts ...Opt) (context.Context, *Snapshotter) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "test")
	s, err := New(ctx, root, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return ctx, s
}

// openSideBySide opens overclone and containerd's built-in overlayfs
// snapshotter on roots of the same filesystem, to be measured together.
func openSideBySide(t *testing.T) (context.Context, *Snapshotter, snapshots.Snapshotter) {
	t.Helper()
	ctx, ours := openTest(t, t.TempDir())
	builtin, err := overlay.NewSnapshotter(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { builtin.Close() })
	return ctx, ours, builtin
}
