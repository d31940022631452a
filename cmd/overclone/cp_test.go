package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/require"
)

// TestCpReadsTheRootAsItsMountsShow: cp must see a snapshot as the mount
// the daemon hands out shows it. In userspace mode that is a plain
// directory, where a 0/0 device and a trusted.overlay.* xattr are a
// container's content; on a root whose overlays are mounted with
// userxattr, a user.overlay whiteout hides the lower file.
func TestCpReadsTheRootAsItsMountsShow(t *testing.T) {
	require.Root(t, "the daemon, devices and trusted xattrs")
	ctx := namespaces.WithNamespace(context.Background(), defaultNamespace)
	run := func(d *daemon.Daemon, args ...string) (string, int) {
		t.Helper()
		var out bytes.Buffer
		code := dispatch(context.Background(), append([]string{args[0], "--address", d.Address}, args[1:]...), &out, &out)
		return out.String(), code
	}

	t.Run("userspace", func(t *testing.T) {
		d := daemon.Start(t, t.TempDir(), "mode = \"userspace\"\n")
		sn := d.Client()
		mounts, err := sn.Prepare(ctx, "ctr", "")
		if err != nil {
			t.Fatal(err)
		}
		if mounts[0].Type != "bind" {
			t.Fatalf("userspace mode handed out %+v", mounts)
		}
		// What a container made in its snapshot: a 0/0 device and a dir
		// with an overlay-looking xattr. Both are its files.
		fsDir := mounts[0].Source
		madeByContainer(t, fsDir)

		dst := filepath.Join(t.TempDir(), "out")
		if out, code := run(d, "cp", "ctr:/", dst); code != exitOK {
			t.Fatalf("cp out: %d %s", code, out)
		}
		wantContent(t, dst)

		// And back in: cp of such a tree keeps them too.
		if out, code := run(d, "cp", dst, "ctr:/in"); code != exitOK {
			t.Fatalf("cp in: %d %s", code, out)
		}
		wantContent(t, filepath.Join(fsDir, "in"))
	})

	t.Run("userxattr", func(t *testing.T) {
		// Forced here: the daemon picks userxattr by itself only where it
		// cannot write trusted xattrs (in a user namespace).
		d := daemon.Start(t, t.TempDir(), "mount_options = [\"userxattr\"]\n")
		sn := d.Client()
		base, err := sn.Prepare(ctx, "base-active", "")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(base[0].Source, "gone"), []byte("stale\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := sn.Commit(ctx, "base", "base-active"); err != nil {
			t.Fatal(err)
		}
		mounts, err := sn.Prepare(ctx, "ctr", "base")
		if err != nil {
			t.Fatal(err)
		}
		upper := ""
		for _, o := range mounts[0].Options {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok {
				upper = v
			}
		}
		if mounts[0].Type != "overlay" || upper == "" || !hasOpt(mounts[0], "userxattr") {
			t.Fatalf("want an overlay with userxattr, got %+v", mounts)
		}
		// The container removed "gone": under userxattr the kernel
		// leaves an xattr whiteout, a user.overlay.whiteout on an empty
		// file, in a dir marked opaque=x.
		wo := filepath.Join(upper, "gone")
		if err := os.WriteFile(wo, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := unix.Lsetxattr(wo, "user.overlay.whiteout", nil, 0); err != nil {
			t.Fatal(err)
		}
		if err := unix.Lsetxattr(upper, "user.overlay.opaque", []byte("x"), 0); err != nil {
			t.Fatal(err)
		}
		dst := t.TempDir()
		if out, code := run(d, "cp", "ctr:/gone", filepath.Join(dst, "gone")); code == exitOK {
			t.Fatalf("cp copied a file the container removed: %s", out)
		}
		if out, code := run(d, "cp", "ctr:/", filepath.Join(dst, "all")); code != exitOK {
			t.Fatalf("cp out: %d %s", code, out)
		}
		if _, err := os.Lstat(filepath.Join(dst, "all", "gone")); !os.IsNotExist(err) {
			t.Errorf("the removed file showed through: %v", err)
		}
	})
}

func hasOpt(m mount.Mount, opt string) bool {
	for _, o := range m.Options {
		if o == opt {
			return true
		}
	}
	return false
}

func madeByContainer(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mknod(filepath.Join(dir, "dev0"), unix.S_IFCHR|0o600, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Lsetxattr(filepath.Join(dir, "d"), "trusted.overlay.opaque", []byte("y"), 0); err != nil {
		t.Fatal(err)
	}
}

func wantContent(t *testing.T, dir string) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(dir, "dev0"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("%s/dev0: the container's 0/0 device is missing (%v, mode %o)", dir, err, st.Mode)
	}
	buf := make([]byte, 8)
	if n, err := unix.Lgetxattr(filepath.Join(dir, "d"), "trusted.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("%s/d: the container's trusted.overlay.opaque is missing: %v", dir, err)
	}
}
