package main

import (
	"bytes"
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

// TestAdminCommands drives health, usage, flatten and cp against the real
// daemon, as an operator would while containerd uses it.
func TestAdminCommands(t *testing.T) {
	root := t.TempDir()
	d := daemon.Start(t, root, "")
	ctx := namespaces.WithNamespace(context.Background(), defaultNamespace)
	sn := d.Client()

	// An image of two layers, the second hiding a file of the first, and
	// a container that changed a file of the image.
	writeLayer(ctx, t, sn, "img-1", "", map[string]string{"etc/motd": "hello\n", "gone": "x"})
	writeLayer(ctx, t, sn, "img-2", "img-1", map[string]string{"app/run.sh": "#!/bin/sh\n"}, "gone")
	mounts, err := sn.Prepare(ctx, "ctr", "img-2")
	if err != nil {
		t.Fatal(err)
	}
	withMount(t, mounts, func(dir string) {
		if err := os.WriteFile(filepath.Join(dir, "etc/motd"), []byte("changed by the container\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	})

	run := func(args ...string) (string, int) {
		t.Helper()
		var out, errb bytes.Buffer
		code := dispatch(context.Background(), append([]string{args[0], "--address", d.Address}, args[1:]...), &out, &errb)
		return out.String() + errb.String(), code
	}

	if out, code := run("health"); code != exitOK || !strings.Contains(out, "SERVING") {
		t.Fatalf("health: %d %s", code, out)
	}

	dst := t.TempDir()
	if out, code := run("cp", "img-2:/", filepath.Join(dst, "image")); code != exitOK {
		t.Fatalf("cp out of the image: %d %s", code, out)
	}
	wantFile(t, filepath.Join(dst, "image/etc/motd"), "hello\n")
	wantFile(t, filepath.Join(dst, "image/app/run.sh"), "#!/bin/sh\n")
	if _, err := os.Stat(filepath.Join(dst, "image/gone")); !os.IsNotExist(err) {
		t.Errorf("a whited-out file was copied out: %v", err)
	}
	if out, code := run("cp", "ctr:/etc/motd", filepath.Join(dst, "motd")); code != exitOK {
		t.Fatalf("cp out of the container: %d %s", code, out)
	}
	wantFile(t, filepath.Join(dst, "motd"), "changed by the container\n")

	src := filepath.Join(dst, "new.conf")
	if err := os.WriteFile(src, []byte("copied in\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := run("cp", src, "ctr:/etc/new.conf"); code != exitOK {
		t.Fatalf("cp into the container: %d %s", code, out)
	}
	if out, code := run("cp", src, "img-2:/etc/new.conf"); code == exitOK || !strings.Contains(out, "only an active snapshot") {
		t.Fatalf("cp into a committed snapshot must fail: %d %s", code, out)
	}
	withMount(t, mustMounts(ctx, t, sn, "ctr"), func(dir string) {
		wantFile(t, filepath.Join(dir, "etc/new.conf"), "copied in\n")
		wantFile(t, filepath.Join(dir, "etc/motd"), "changed by the container\n")
	})

	// Two layers fit in any overlay mount: nothing to build.
	out, code := run("flatten", "img-2")
	if code != exitOK || !strings.Contains(out, "nothing to flatten") {
		t.Fatalf("flatten: %d %s", code, out)
	}

	out, code = run("usage", "--root", root)
	if code != exitOK || !strings.Contains(out, "img-2") || !strings.Contains(out, "ctr") {
		t.Fatalf("usage: %d %s", code, out)
	}
	// Something no snapshot owns, as a crash leaves it.
	orphan := filepath.Join(root, "snapshots", "999", "fs")
	if err := os.MkdirAll(orphan, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(orphan, "junk"), make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	out, code = run("gc", "--dry-run")
	if code != exitOK || !strings.Contains(out, filepath.Join(root, "snapshots", "999")) || !strings.Contains(out, "directory without metadata") {
		t.Fatalf("gc --dry-run on a live daemon: %d %s", code, out)
	}
	if _, err := os.Stat(orphan); err != nil {
		t.Fatalf("a dry run removed the orphan: %v", err)
	}
	if out, code := run("gc"); code != exitOK {
		t.Fatalf("gc: %d %s", code, out)
	}
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Fatalf("gc left the orphan: %v", err)
	}
	// containerd's Cleanup leaves the trash to the background; gc by
	// hand returns only once it is deleted.
	if left, err := os.ReadDir(filepath.Join(root, "trash")); err != nil || len(left) != 0 {
		t.Fatalf("gc returned with %d entries in the trash (%v)", len(left), err)
	}

	// The CLI's temporary views are gone again.
	if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if strings.HasPrefix(info.Name, "overclone-") {
			t.Errorf("temporary snapshot %s left behind", info.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

func writeLayer(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, name, parent string, files map[string]string, remove ...string) {
	t.Helper()
	mounts, err := sn.Prepare(ctx, name+"-active", parent)
	if err != nil {
		t.Fatal(err)
	}
	withMount(t, mounts, func(dir string) {
		for p, content := range files {
			if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, p)), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, p), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		for _, p := range remove {
			if err := os.Remove(filepath.Join(dir, p)); err != nil {
				t.Fatal(err)
			}
		}
	})
	if err := sn.Commit(ctx, name, name+"-active"); err != nil {
		t.Fatal(err)
	}
}

func mustMounts(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, key string) []mount.Mount {
	t.Helper()
	m, err := sn.Mounts(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func withMount(t *testing.T, mounts []mount.Mount, fn func(dir string)) {
	t.Helper()
	dir := t.TempDir()
	if err := mount.All(mounts, dir); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(dir, 0)
	fn(dir)
}

func wantFile(t *testing.T, path, want string) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil || string(got) != want {
		t.Errorf("%s: %q (%v), want %q", path, got, err, want)
	}
}

// TestGCStoppedRoot: with no daemon on the socket, gc reads the root itself.
func TestGCStoppedRoot(t *testing.T) {
	root := t.TempDir()
	d := daemon.Start(t, root, "")
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "snapshots", "5", "fs"), 0o755); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	args := []string{"gc", "--dry-run", "--address", d.Address, "--root", root}
	if code := dispatch(context.Background(), args, &out, &out); code != exitOK || !strings.Contains(out.String(), "1 orphans") {
		t.Fatalf("gc --dry-run on a stopped root: %d %s", code, out.String())
	}
	out.Reset()
	if code := dispatch(context.Background(), []string{"gc", "--address", d.Address, "--root", root}, &out, &out); code != exitOK {
		t.Fatalf("gc on a stopped root: %s", out.String())
	}
	if _, err := os.Stat(filepath.Join(root, "snapshots", "5")); !os.IsNotExist(err) {
		t.Fatalf("gc left the orphan: %v", err)
	}
}
