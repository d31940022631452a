package proxy

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/daemon"
)

// TestErrorClasses checks that bad input gets the errdefs class containerd
// uses, both in-process and after the gRPC hop (where the class travels as
// a gRPC status code and must come back as the same class).
func TestErrorClasses(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	inproc, err := snapshotter.New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inproc.Close() })
	d := daemon.Start(t, t.TempDir(), "")

	for name, sn := range map[string]snapshots.Snapshotter{"in-process": inproc, "grpc": d.Client()} {
		t.Run(name, func(t *testing.T) {
			checkErrorClasses(ctx, t, sn)
		})
	}
}

func checkErrorClasses(ctx context.Context, t *testing.T, sn snapshots.Snapshotter) {
	// A committed base, an active snapshot and a view to misuse.
	if _, err := sn.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "active", "base"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.View(ctx, "view", "base"); err != nil {
		t.Fatal(err)
	}
	bigLabel := map[string]string{"containerd.io/snapshot/big": strings.Repeat("x", 5000)}

	for _, tc := range []struct {
		name  string
		call  func() error
		class error
	}{
		{"empty key", func() error { _, err := sn.Prepare(ctx, "", ""); return err }, errdefs.ErrInvalidArgument},
		{"key with NUL", func() error { _, err := sn.Prepare(ctx, "a\x00b", ""); return err }, errdefs.ErrInvalidArgument},
		{"key with ..", func() error { _, err := sn.Prepare(ctx, "a/../../etc", ""); return err }, errdefs.ErrInvalidArgument},
		{"key over the length limit", func() error { _, err := sn.Prepare(ctx, strings.Repeat("k", 5000), ""); return err }, errdefs.ErrInvalidArgument},
		{"label over containerd's limit", func() error {
			_, err := sn.Prepare(ctx, "labelled", "", snapshots.WithLabels(bigLabel))
			return err
		}, errdefs.ErrInvalidArgument},
		{"missing parent", func() error { _, err := sn.Prepare(ctx, "orphan", "no-such-parent"); return err }, errdefs.ErrNotFound},
		{"parent not committed", func() error { _, err := sn.Prepare(ctx, "on-active", "active"); return err }, errdefs.ErrInvalidArgument},
		{"prepare existing key", func() error { _, err := sn.Prepare(ctx, "active", "base"); return err }, errdefs.ErrAlreadyExists},
		{"view existing key", func() error { _, err := sn.View(ctx, "base", "base"); return err }, errdefs.ErrAlreadyExists},
		{"commit a view", func() error { return sn.Commit(ctx, "from-view", "view") }, errdefs.ErrFailedPrecondition},
		{"commit a committed snapshot", func() error { return sn.Commit(ctx, "again", "base") }, errdefs.ErrFailedPrecondition},
		{"commit a missing key", func() error { return sn.Commit(ctx, "x", "no-such-key") }, errdefs.ErrNotFound},
		{"commit onto an existing name", func() error {
			if _, err := sn.Prepare(ctx, "second", ""); err != nil {
				return err
			}
			return sn.Commit(ctx, "base", "second")
		}, errdefs.ErrAlreadyExists},
		{"remove a snapshot with children", func() error { return sn.Remove(ctx, "base") }, errdefs.ErrFailedPrecondition},
		{"remove a missing key", func() error { return sn.Remove(ctx, "no-such-key") }, errdefs.ErrNotFound},
		{"mounts of a committed snapshot", func() error { _, err := sn.Mounts(ctx, "base"); return err }, errdefs.ErrFailedPrecondition},
		{"mounts of a missing key", func() error { _, err := sn.Mounts(ctx, "no-such-key"); return err }, errdefs.ErrNotFound},
		{"stat a missing key", func() error { _, err := sn.Stat(ctx, "no-such-key"); return err }, errdefs.ErrNotFound},
		{"usage of a missing key", func() error { _, err := sn.Usage(ctx, "no-such-key"); return err }, errdefs.ErrNotFound},
		{"update a missing key", func() error {
			_, err := sn.Update(ctx, snapshots.Info{Name: "no-such-key"})
			return err
		}, errdefs.ErrNotFound},
		{"update a field that cannot change", func() error {
			_, err := sn.Update(ctx, snapshots.Info{Name: "base"}, "parent")
			return err
		}, errdefs.ErrInvalidArgument},
		{"walk with a bad filter", func() error {
			return sn.Walk(ctx, func(context.Context, snapshots.Info) error { return nil }, "labels.\"x\"==")
		}, errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if err == nil {
				t.Fatalf("want %v, got success", tc.class)
			}
			if !errors.Is(err, tc.class) {
				t.Fatalf("want class %v, got %v", tc.class, err)
			}
		})
	}

	// Nothing the bad calls did may have changed what was there.
	for _, key := range []string{"base", "active", "view"} {
		if _, err := sn.Stat(ctx, key); err != nil {
			t.Errorf("%s lost after bad calls: %v", key, err)
		}
	}
	for _, key := range []string{"orphan", "on-active", "labelled", "from-view", "again", "x"} {
		if _, err := sn.Stat(ctx, key); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("bad call left %q behind: %v", key, err)
		}
	}
}
