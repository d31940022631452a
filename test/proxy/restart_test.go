package proxy

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/overclone/overclone/test/daemon"
)

// TestRestart stops the daemon (cleanly, then by SIGKILL) and starts it
// again on the same root: every snapshot is still there, the mounts it hands
// out are the same and still mount, and the files are intact.
func TestRestart(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	d := daemon.Start(t, t.TempDir(), "")
	sn := d.Client()

	mountAndWrite(ctx, t, sn, "l1-active", "", "one", "first layer")
	if err := sn.Commit(ctx, "l1", "l1-active"); err != nil {
		t.Fatal(err)
	}
	mountAndWrite(ctx, t, sn, "l2-active", "l1", "two", "second layer")
	if err := sn.Commit(ctx, "l2", "l2-active"); err != nil {
		t.Fatal(err)
	}
	mountAndWrite(ctx, t, sn, "container", "l2", "three", "container write")
	if _, err := sn.View(ctx, "view", "l2"); err != nil {
		t.Fatal(err)
	}
	before := walkAll(ctx, t, sn)
	mountsBefore, err := sn.Mounts(ctx, "container")
	if err != nil {
		t.Fatal(err)
	}

	for _, how := range []string{"SIGTERM", "SIGKILL"} {
		t.Run(how, func(t *testing.T) {
			if how == "SIGTERM" {
				if err := d.Stop(); err != nil {
					t.Fatalf("clean stop: %v\n%s", err, d.Log())
				}
			} else {
				d.Kill()
			}
			if err := d.Restart(); err != nil {
				t.Fatal(err)
			}
			sn := d.Client()
			after := walkAll(ctx, t, sn)
			if len(after) != len(before) {
				t.Fatalf("walk before restart %v, after %v", before, after)
			}
			for k, info := range before {
				if after[k].Kind != info.Kind || after[k].Parent != info.Parent {
					t.Errorf("%s changed over restart: %+v -> %+v", k, info, after[k])
				}
			}
			mounts, err := sn.Mounts(ctx, "container")
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(mounts[0].Options, ",") != strings.Join(mountsBefore[0].Options, ",") {
				t.Fatalf("mounts changed over restart:\n%v\n%v", mountsBefore, mounts)
			}
			target := t.TempDir()
			if err := mount.All(mounts, target); err != nil {
				t.Fatal(err)
			}
			defer mount.UnmountAll(target, 0)
			for name, want := range map[string]string{"one": "first layer", "two": "second layer", "three": "container write"} {
				got, err := os.ReadFile(filepath.Join(target, name))
				if err != nil || string(got) != want {
					t.Errorf("%s after restart: %q, %v", name, got, err)
				}
			}
		})
	}
}

// mountAndWrite prepares key on parent, mounts it and writes one file.
func mountAndWrite(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, key, parent, name, content string) {
	t.Helper()
	mounts, err := sn.Prepare(ctx, key, parent)
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(target, 0)
	if err := os.WriteFile(filepath.Join(target, name), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func walkAll(ctx context.Context, t *testing.T, sn snapshots.Snapshotter) map[string]snapshots.Info {
	t.Helper()
	all := map[string]snapshots.Info{}
	if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		all[info.Name] = info
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return all
}
