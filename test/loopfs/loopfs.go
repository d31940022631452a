// Package loopfs makes real filesystems for tests: an image file formatted as
// ext4, xfs (with reflink) or btrfs, attached to a loop device and mounted in
// a temporary directory, or a tmpfs. Tests use it to run the same code on
// backing filesystems that do and do not reflink, as the kernel sees them.
//
// It needs root and the mkfs tools from e2fsprogs, xfsprogs and btrfs-progs;
// when something is missing the test is skipped with the reason, never faked.
package loopfs

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/require"
)

// Kind is a backing filesystem a test can ask for.
type Kind string

const (
	Ext4  Kind = "ext4"
	XFS   Kind = "xfs" // formatted with reflink=1
	Btrfs Kind = "btrfs"
	Tmpfs Kind = "tmpfs"
)

// All lists every kind, in the order tests usually iterate them.
var All = []Kind{Ext4, XFS, Btrfs, Tmpfs}

// Reflinks reports whether the kind shares extents on FICLONE.
func (k Kind) Reflinks() bool { return k == XFS || k == Btrfs }

// defaultSize fits every test here; the image file is sparse, so an unused
// gigabyte costs nothing on the host. xfs needs at least 300 MiB.
const defaultSize = 2 << 30

// mkfsArgs are quiet, fast formats. ext4 skips lazy init so that the
// filesystem does not write in the background while a test measures it.
var mkfsArgs = map[Kind][]string{
	Ext4:  {"mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"},
	XFS:   {"mkfs.xfs", "-q", "-f", "-m", "reflink=1"},
	Btrfs: {"mkfs.btrfs", "-q", "-f"},
}

// Mount makes a fresh filesystem of kind k and returns the directory it is
// mounted on. It is unmounted and its image removed when the test ends.
func Mount(t testing.TB, k Kind) string {
	t.Helper()
	return MountSize(t, k, defaultSize)
}

// MountSize is Mount with the size of the filesystem in bytes.
func MountSize(t testing.TB, k Kind, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		require.Skipf(t, "mounting %s needs root", k)
	}
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if k == Tmpfs {
		opts := fmt.Sprintf("size=%d", size)
		if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, opts); err != nil {
			t.Fatalf("mount tmpfs on %s: %v", mnt, err)
		}
		t.Cleanup(func() { unmount(t, mnt) })
		return mnt
	}
	args, ok := mkfsArgs[k]
	if !ok {
		t.Fatalf("loopfs: unknown kind %q", k)
	}
	if _, err := exec.LookPath(args[0]); err != nil {
		require.Skipf(t, "%s not installed (Debian package %s): %v", args[0], debPackage(k), err)
	}
	img := filepath.Join(dir, "fs.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		t.Fatal(err)
	}
	f.Close()
	if out, err := exec.Command(args[0], append(args[1:], img)...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", args[0], img, err, out)
	}
	// mount(8) with -o loop picks a free loop device and detaches it on
	// umount (autoclear), which is what a test wants.
	if out, err := exec.Command("mount", "-t", string(k), "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount %s image %s: %v: %s", k, img, err, out)
	}
	t.Cleanup(func() { unmount(t, mnt) })
	return mnt
}

// unmount detaches mnt lazily if it is still busy, so a failed test does
// not leave the loop device behind for the next one.
func unmount(t testing.TB, mnt string) {
	// Tests may leave overlay mounts below mnt; take them down first.
	if data, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		var below []string
		for _, line := range strings.Split(string(data), "\n") {
			fields := strings.Fields(line)
			if len(fields) > 4 && strings.HasPrefix(fields[4], mnt+"/") {
				below = append(below, fields[4])
			}
		}
		for i := len(below) - 1; i >= 0; i-- {
			_ = unix.Unmount(below[i], unix.MNT_DETACH)
		}
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		if err2 := unix.Unmount(mnt, unix.MNT_DETACH); err2 != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	}
}

func debPackage(k Kind) string {
	switch k {
	case XFS:
		return "xfsprogs"
	case Btrfs:
		return "btrfs-progs"
	}
	return "e2fsprogs"
}

// FSType returns the name of the filesystem dir lives on, as statfs tells it.
func FSType(dir string) (string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "", fmt.Errorf("statfs %s: %w", dir, err)
	}
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4", nil
	case unix.XFS_SUPER_MAGIC:
		return "xfs", nil
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs", nil
	case unix.TMPFS_MAGIC:
		return "tmpfs", nil
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlay", nil
	}
	return fmt.Sprintf("0x%x", st.Type), nil
}

// Quota is how EnableQuotas turns on btrfs quotas.
type Quota string

const (
	// Qgroups: full qgroup accounting, `btrfs quota enable`.
	Qgroups Quota = "qgroup"
	// SimpleQuotas: simple quotas (kernel 6.7+), `btrfs quota enable
	// --simple` in btrfs-progs 6.7+; made here with the ioctl itself,
	// since Debian's btrfs-progs may be older than the kernel.
	SimpleQuotas Quota = "squota"
)

// btrfsIocQuotaCtl is _IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args).
const (
	btrfsIocQuotaCtl         = 0xc0109428
	btrfsQuotaCtlEnableSimpl = 4
)

// EnableQuotas turns on quotas of kind q on the btrfs filesystem mounted on
// mnt (from MountSize), as an operator would; it skips where this kernel
// cannot.
func EnableQuotas(t testing.TB, mnt string, q Quota) {
	t.Helper()
	if q == Qgroups {
		if out, err := exec.Command("btrfs", "quota", "enable", mnt).CombinedOutput(); err != nil {
			t.Fatalf("btrfs quota enable %s: %v: %s", mnt, err, out)
		}
		return
	}
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	args := struct{ Cmd, Status uint64 }{Cmd: btrfsQuotaCtlEnableSimpl}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), btrfsIocQuotaCtl, uintptr(unsafe.Pointer(&args))); errno != 0 {
		if errno == unix.EINVAL || errno == unix.EOPNOTSUPP {
			require.Skipf(t, "this kernel has no btrfs simple quotas: %v", errno)
		}
		t.Fatalf("enable btrfs simple quotas on %s: %v", mnt, errno)
	}
}

// QgroupIDs lists the level-0 qgroups of the btrfs filesystem holding mnt,
// as `btrfs qgroup show` does ("0/256"), stale ones too.
func QgroupIDs(t testing.TB, mnt string) []string {
	t.Helper()
	out, err := exec.Command("btrfs", "qgroup", "show", mnt).CombinedOutput()
	if err != nil {
		t.Fatalf("btrfs qgroup show %s: %v: %s", mnt, err, out)
	}
	var ids []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "0/") {
			ids = append(ids, f[0])
		}
	}
	return ids
}

// SubvolumeSync waits until every deleted subvolume of the btrfs
// filesystem on mnt is gone (the kernel's cleaner freed it) and commits
// what that freed. It commits the filesystem first (`btrfs filesystem
// sync`, which also wakes the cleaner): otherwise the cleaner starts only
// at the next periodic commit, up to 30 s later. And it commits once more
// at the end: with simple quotas the freed extents, and so the deletion of
// the subvolume's qgroup, are accounted at that commit.
func SubvolumeSync(t testing.TB, mnt string) {
	t.Helper()
	for _, args := range [][]string{{"filesystem", "sync"}, {"subvolume", "sync"}, {"filesystem", "sync"}} {
		if out, err := exec.Command("btrfs", append(args, mnt)...).CombinedOutput(); err != nil {
			t.Fatalf("btrfs %v %s: %v: %s", args, mnt, err, out)
		}
	}
}

// Subvolumes lists the subvolumes of the btrfs filesystem holding mnt, as
// `btrfs subvolume list` shows them (paths from the filesystem's top),
// the top-level one aside.
func Subvolumes(t testing.TB, mnt string) []string {
	t.Helper()
	out, err := exec.Command("btrfs", "subvolume", "list", mnt).CombinedOutput()
	if err != nil {
		t.Fatalf("btrfs subvolume list %s: %v: %s", mnt, err, out)
	}
	var paths []string
	for _, line := range strings.Split(string(out), "\n") {
		// "ID 256 gen 9 top level 5 path root/snapshots/3"
		if _, path, ok := strings.Cut(line, " path "); ok {
			paths = append(paths, path)
		}
	}
	return paths
}

// NoQuotaLeft fails t unless the btrfs filesystem on mnt, once its
// cleaner has dropped every deleted subvolume, holds no subvolume and no
// level-0 qgroup but its top-level one (0/5): what a root with quotas
// must look like once everything on it was removed.
func NoQuotaLeft(t testing.TB, mnt string) {
	t.Helper()
	SubvolumeSync(t, mnt)
	if subs := Subvolumes(t, mnt); len(subs) > 0 {
		t.Errorf("subvolumes left on %s: %v", mnt, subs)
	}
	if ids := QgroupIDs(t, mnt); len(ids) != 1 || ids[0] != "0/5" {
		t.Errorf("qgroups left on %s: %v, want the top level's 0/5 alone", mnt, ids)
	}
}
