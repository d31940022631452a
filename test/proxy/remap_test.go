package proxy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/remap"
	"github.com/overclone/overclone/test/require"
)

// TestRemapIDsThroughProxy: the uid/gid mapping labels reach the daemon
// through containerd's proxy client, and the mounts that come back, mounted
// by containerd's mount code, show the mapped owners, in both modes; a file
// the container's root writes lands in its upper as the mapped host ids.
func TestRemapIDsThroughProxy(t *testing.T) {
	require.Root(t, "mounts")
	base := loopfs.Mount(t, loopfs.XFS)
	remap.RequireIdmapped(t, filepath.Join(base, "probe"))
	mapped := remap.Mapped(0, 0)
	for _, mode := range []string{"overlay", "userspace"} {
		t.Run(mode, func(t *testing.T) {
			ctx := namespaces.WithNamespace(context.Background(), "test")
			d := daemon.Start(t, filepath.Join(base, mode), fmt.Sprintf("mode = %q\n", mode))
			sn := d.Client()
			remap.Layers(ctx, t, sn, "")
			ms, err := sn.Prepare(ctx, "c", "l2", snapshots.WithLabels(remap.Labels()))
			if err != nil {
				t.Fatal(err)
			}
			seen, upper := remap.Container(t, ms, "new", ".", "f", "d/g", "h")
			want := map[string]string{".": mapped, "f": mapped, "d/g": remap.Mapped(1000, 1000), "h": mapped, "new": mapped}
			for p, w := range want {
				if seen[p] != w {
					t.Errorf("%s owned by %s through the mount, want %s", p, seen[p], w)
				}
			}
			if got := remap.Owner(filepath.Join(upper, "new")); got != mapped {
				t.Errorf("new in the upper %s owned by %s, want %s", upper, got, mapped)
			}
			vms, err := sn.View(ctx, "v", "l1", snapshots.WithLabels(remap.Labels()))
			if err != nil {
				t.Fatal(err)
			}
			if got := remap.Owners(t, vms, "d/g")["d/g"]; got != remap.Mapped(1000, 1000) {
				t.Errorf("view of one layer: d/g owned by %s, want %s", got, remap.Mapped(1000, 1000))
			}
			// The labels are stored and come back as given.
			info, err := sn.Stat(ctx, "c")
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range remap.Labels() {
				if info.Labels[k] != v {
					t.Errorf("label %s = %q after the hop, want %q", k, info.Labels[k], v)
				}
			}
		})
	}
}

// TestRemapCopyThroughProxy: a daemon configured with remap = "copy" serves
// mapped snapshots on its reflinked copy of the image with the owners
// shifted even where the kernel could idmap the layers, the way a kernel
// without idmapped layers is served: the labels come back as given, the
// mounts carry no uidmap=, the owners are mapped through the mount and in
// the upper, two containers with the same mapping share one copy, and the
// copy goes with the last of them.
func TestRemapCopyThroughProxy(t *testing.T) {
	require.Root(t, "mounts")
	base := loopfs.Mount(t, loopfs.XFS)
	root := filepath.Join(base, "root")
	ctx := namespaces.WithNamespace(context.Background(), "test")
	d := daemon.Start(t, root, "remap = \"copy\"\n")
	if log := d.Log(); !strings.Contains(log, `remap_ids="chowned copy"`) || !strings.Contains(log, "remap=copy") {
		t.Errorf("the start log does not say the copy is used:\n%s", log)
	}
	sn := d.Client()
	remap.Layers(ctx, t, sn, "")
	mapped := remap.Mapped(0, 0)
	copies := func() []string {
		t.Helper()
		names, err := filepath.Glob(filepath.Join(root, "remap", "*"))
		if err != nil {
			t.Fatal(err)
		}
		return names
	}

	for _, key := range []string{"c1", "c2"} {
		ms, err := sn.Prepare(ctx, key, "l2", snapshots.WithLabels(remap.Labels()))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range ms {
			for _, o := range m.Options {
				if strings.HasPrefix(o, "uidmap=") || strings.HasPrefix(o, "gidmap=") {
					t.Errorf("%s: mount option %s, want none: the copy is owned by the mapped ids", key, o)
				}
			}
		}
		seen, upper := remap.Container(t, ms, "new", ".", "f", "d/g", "h", "s")
		want := map[string]string{".": mapped, "f": mapped, "d/g": remap.Mapped(1000, 1000), "h": mapped, "s": mapped, "new": mapped}
		for p, w := range want {
			if seen[p] != w {
				t.Errorf("%s: %s owned by %s through the mount, want %s", key, p, seen[p], w)
			}
		}
		if got := remap.Owner(filepath.Join(upper, "new")); got != mapped {
			t.Errorf("%s: new in the upper %s owned by %s, want %s", key, upper, got, mapped)
		}
		info, err := sn.Stat(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range remap.Labels() {
			if info.Labels[k] != v {
				t.Errorf("%s: label %s = %q after the hop, want %q", key, k, info.Labels[k], v)
			}
		}
		if got := copies(); len(got) != 1 {
			t.Fatalf("after %s: shifted copies %v, want one shared", key, got)
		}
	}

	shared := copies()[0]
	if err := sn.Remove(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(shared); err != nil {
		t.Fatalf("the copy c2 stands on went with c1: %v", err)
	}
	if err := sn.Remove(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	if got := copies(); len(got) != 0 {
		t.Errorf("shifted copies %v left after their last snapshot was removed", got)
	}
}
