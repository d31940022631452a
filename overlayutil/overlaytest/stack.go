// Package overlaytest builds deep layer stacks through any containerd
// snapshotter, with real mounts through containerd's core/mount, and checks
// the merged view, so that overclone and containerd's built-in overlayfs
// snapshotter can be measured side by side at the same depths.
//
// Layer i (from 1, the bottom) holds a file layer-<i> and a file shared,
// both containing i; a stack of n layers shows n+1 names and shared = n.
// It needs root and is meant for tests only.
package overlaytest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
)

// LayerName is the committed name of layer i of a chain made with prefix.
func LayerName(prefix string, i int) string { return fmt.Sprintf("%slayer-%d", prefix, i) }

// CommitChain commits layers 1..n in sn, each on the one before, writing
// each layer's files through the mounts its Prepare returned (as an applier
// that cannot write the upper directly would). tmp holds the temporary
// mount points. It stops at the first layer that fails and says which.
func CommitChain(ctx context.Context, sn snapshots.Snapshotter, prefix string, n int, tmp string) error {
	parent := ""
	for i := 1; i <= n; i++ {
		key := LayerName(prefix, i) + "-active"
		ms, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			return fmt.Errorf("prepare layer %d: %w", i, err)
		}
		target, err := os.MkdirTemp(tmp, "apply-")
		if err != nil {
			return err
		}
		if err := mount.All(ms, target); err != nil {
			return fmt.Errorf("mount layer %d for writing: %w", i, err)
		}
		werr := writeLayer(target, i)
		if err := mount.UnmountAll(target, 0); err != nil {
			return fmt.Errorf("unmount layer %d: %w", i, err)
		}
		if werr != nil {
			return werr
		}
		if err := os.Remove(target); err != nil {
			return err
		}
		name := LayerName(prefix, i)
		if err := sn.Commit(ctx, name, key); err != nil {
			return fmt.Errorf("commit layer %d: %w", i, err)
		}
		parent = name
	}
	return nil
}

func writeLayer(dir string, i int) error {
	id := strconv.Itoa(i)
	for _, f := range []string{"layer-" + id, "shared"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(id), 0o644); err != nil {
			return fmt.Errorf("write layer %d: %w", i, err)
		}
	}
	return nil
}

// MountTop prepares an active snapshot key on the committed layer n of the
// chain and mounts it on target with core/mount. It returns the mounts it
// got, for the caller to inspect, and the unmount to defer when err is nil.
func MountTop(ctx context.Context, sn snapshots.Snapshotter, prefix string, n int, key, target string) ([]mount.Mount, func() error, error) {
	ms, err := sn.Prepare(ctx, key, LayerName(prefix, n))
	if err != nil {
		return nil, nil, fmt.Errorf("prepare on %d layers: %w", n, err)
	}
	if err := mount.All(ms, target); err != nil {
		return ms, nil, fmt.Errorf("mount %d layers: %w", n, err)
	}
	return ms, func() error { return mount.UnmountAll(target, 0) }, nil
}

// VerifyMerged checks that target shows a stack of n layers: every layer's
// file, the top layer's shared, and a write that lands.
func VerifyMerged(target string, n int) error {
	ents, err := os.ReadDir(target)
	if err != nil {
		return err
	}
	var errs []error
	if len(ents) != n+1 {
		errs = append(errs, fmt.Errorf("merged view of %d layers has %d names, want %d", n, len(ents), n+1))
	}
	for _, i := range []int{1, n / 2, n} {
		if i < 1 {
			continue
		}
		f := filepath.Join(target, "layer-"+strconv.Itoa(i))
		if b, err := os.ReadFile(f); err != nil || string(b) != strconv.Itoa(i) {
			errs = append(errs, fmt.Errorf("%s = %q, %v; want %d", f, b, err, i))
		}
	}
	if b, err := os.ReadFile(filepath.Join(target, "shared")); err != nil || string(b) != strconv.Itoa(n) {
		errs = append(errs, fmt.Errorf("shared = %q, %v; want the top layer's %d", b, err, n))
	}
	if err := os.WriteFile(filepath.Join(target, "written"), []byte("x"), 0o644); err != nil {
		errs = append(errs, fmt.Errorf("write to the merged view: %w", err))
	}
	return errors.Join(errs...)
}
