// Package remap drives a snapshotter the way containerd does for a
// user-namespaced container (the uid/gid mapping labels on Prepare and
// View), mounts what it hands back with containerd's own mount code (which
// makes the idmapped mounts), and reports the owners seen through the
// mounts and in the container's upper. It is shared by the in-process
// tests, the proxy tests and the comparison with containerd's built-in.
package remap

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/overclone/overclone/overlayutil"
	"github.com/overclone/overclone/test/require"
	"golang.org/x/sys/unix"
)

// HostRoot is the host id the container's root maps to; Size ids are
// mapped from there, as a kubelet maps a pod's 65536.
const (
	HostRoot = 100000
	Size     = 65536
)

// Labels are the mapping labels of a container mapped at HostRoot.
func Labels() map[string]string {
	m := fmt.Sprintf("0:%d:%d", HostRoot, Size)
	return map[string]string{snapshots.LabelSnapshotUIDMapping: m, snapshots.LabelSnapshotGIDMapping: m}
}

// CapNetRaw is a version 2 security.capability value granting
// CAP_NET_RAW, effective: what `setcap cap_net_raw+ep` writes.
var CapNetRaw = []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

// Layers commits two layers, prefix+"l1" and prefix+"l2" on it:
//
//	l1: f 0:0, d/ and d/g 1000:1000, s 0:0 mode 04755 with CapNetRaw
//	l2: h 0:0
func Layers(ctx context.Context, t testing.TB, sn snapshots.Snapshotter, prefix string) {
	t.Helper()
	write(ctx, t, sn, prefix+"l1", "", func(dir string) error {
		if err := os.WriteFile(filepath.Join(dir, "f"), []byte("f"), 0o644); err != nil {
			return err
		}
		if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "d", "g"), []byte("g"), 0o644); err != nil {
			return err
		}
		for _, p := range []string{"d", "d/g"} {
			if err := os.Lchown(filepath.Join(dir, p), 1000, 1000); err != nil {
				return err
			}
		}
		s := filepath.Join(dir, "s")
		if err := os.WriteFile(s, []byte("s"), 0o755); err != nil {
			return err
		}
		// Setting capabilities clears set-id bits: they go first.
		if err := unix.Lsetxattr(s, "security.capability", CapNetRaw, 0); err != nil {
			return err
		}
		return unix.Chmod(s, 0o4755) // os.Chmod wants os.ModeSetuid
	})
	write(ctx, t, sn, prefix+"l2", prefix+"l1", func(dir string) error {
		return os.WriteFile(filepath.Join(dir, "h"), []byte("h"), 0o644)
	})
}

func write(ctx context.Context, t testing.TB, sn snapshots.Snapshotter, name, parent string, fill func(string) error) {
	t.Helper()
	ms, err := sn.Prepare(ctx, name+"-active", parent)
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.WithTempMount(ctx, ms, fill); err != nil {
		t.Fatalf("fill %s: %v", name, err)
	}
	if err := sn.Commit(ctx, name, name+"-active"); err != nil {
		t.Fatal(err)
	}
}

// Owners mounts ms (with containerd's mount code) and returns the owner,
// "uid:gid", of each path through the mount, "missing" for one not there.
func Owners(t testing.TB, ms []mount.Mount, paths ...string) map[string]string {
	t.Helper()
	target := t.TempDir()
	if err := mount.All(ms, target); err != nil {
		t.Fatalf("mount %+v: %v", ms, err)
	}
	defer mount.UnmountAll(target, 0)
	return ownersIn(target, paths...)
}

func ownersIn(dir string, paths ...string) map[string]string {
	out := map[string]string{}
	for _, p := range paths {
		out[p] = Owner(filepath.Join(dir, p))
	}
	return out
}

// Owner is "uid:gid" of path, not following a symlink, or "missing".
func Owner(path string) string {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return "missing"
	}
	return fmt.Sprintf("%d:%d", st.Uid, st.Gid)
}

// Mapped is "uid:gid" of a container id pair mapped at HostRoot.
func Mapped(uid, gid int) string { return fmt.Sprintf("%d:%d", HostRoot+uid, HostRoot+gid) }

// Container mounts ms, creates name in its root as the mapped root would
// (fsuid and fsgid HostRoot), and returns the owners seen through the
// mount of paths and of name, and the path of the upper dir name landed
// in: the overlay's upperdir, or the source of a read-write bind.
func Container(t testing.TB, ms []mount.Mount, name string, paths ...string) (seen map[string]string, upper string) {
	t.Helper()
	target := t.TempDir()
	if err := mount.All(ms, target); err != nil {
		t.Fatalf("mount %+v: %v", ms, err)
	}
	defer mount.UnmountAll(target, 0)
	if err := CreateAs(target, name, HostRoot, HostRoot); err != nil {
		t.Fatal(err)
	}
	return ownersIn(target, append(paths, name)...), UpperOf(ms)
}

// UpperOf is the dir a container's writes land in.
func UpperOf(ms []mount.Mount) string {
	for _, m := range ms {
		for _, o := range m.Options {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok {
				return v
			}
		}
		if m.Type == "bind" {
			return m.Source
		}
	}
	return ""
}

// CreateAs creates name in dir with fsuid uid and fsgid gid, as a process
// of that user creates files: the directory is opened first, so that only
// its own permissions are checked, not those of the test's temp dirs.
func CreateAs(dir, name string, uid, gid int) error {
	dfd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	// fsuid and fsgid belong to the thread.
	runtime.LockOSThread()
	unix.Setfsgid(gid)
	unix.Setfsuid(uid)
	fd, err := unix.Openat(dfd, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
	unix.Setfsuid(0)
	unix.Setfsgid(0)
	if fsuid() == 0 {
		runtime.UnlockOSThread()
	} // else the thread ends with the goroutine, and its ids with it
	if err != nil {
		return fmt.Errorf("create %s in %s as %d:%d: %w", name, dir, uid, gid, err)
	}
	return unix.Close(fd)
}

// fsuid is the thread's fsuid: setfsuid(-1) changes nothing and returns it.
func fsuid() int {
	r, _, _ := unix.RawSyscall(unix.SYS_SETFSUID, ^uintptr(0), 0, 0)
	return int(r)
}

// RequireIdmapped skips t (a failure under OVERCLONE_STRICT) unless
// overlay takes idmapped layers on the filesystem holding dir, where the
// probe runs, and returns what the probe found.
func RequireIdmapped(t *testing.T, dir string) *overlayutil.Features {
	t.Helper()
	f, err := overlayutil.Probe(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	if !f.OK(overlayutil.CheckIDMapped) {
		require.Skipf(t, "the kernel has no idmapped overlay layers on %s: %s", f.BackingFS, f.Get(overlayutil.CheckIDMapped).Reason)
	}
	return f
}
