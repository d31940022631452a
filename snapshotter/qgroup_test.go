package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	cfs "github.com/containerd/continuity/fs"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// quotaKinds are the btrfs quota modes a root's filesystem can have.
var quotaKinds = []loopfs.Quota{loopfs.Qgroups, loopfs.SimpleQuotas}

// qgroupRoot is a root on a new btrfs with quotas of kind q enabled, and
// the filesystem's mount point.
func qgroupRoot(t *testing.T, q loopfs.Quota) (root, mnt string) {
	t.Helper()
	require.Root(t, "btrfs quotas need a loop-mounted btrfs")
	mnt = loopfs.Mount(t, loopfs.Btrfs)
	loopfs.EnableQuotas(t, mnt, q)
	return filepath.Join(mnt, "root"), mnt
}

// subvolIDOf is the btrfs subvolume id (and level-0 qgroup) of dir.
func subvolIDOf(t *testing.T, dir string) string {
	t.Helper()
	fd, id := openSubvol(t, dir)
	unix.Close(fd)
	return "0/" + strconv.FormatUint(id, 10)
}

// TestQgroupLimit, on a btrfs root with qgroups and with simple quotas:
// a limited active's directory is a subvolume with its qgroup limited; a
// container writing through a real overlay mount gets EDQUOT near the
// limit (not before 80% of it), still sees its image's files; its Usage
// agrees with a walk; a container without a limit writes past that size;
// the limit and files survive a restart; Remove destroys the subvolume
// and the kernel its qgroup.
func TestQgroupLimit(t *testing.T) {
	for _, q := range quotaKinds {
		t.Run(string(q), func(t *testing.T) {
			root, mnt := qgroupRoot(t, q)
			ctx, s := openTest(t, root, WithMode(ModeOverlay))
			if s.limits.Backend != LimitQgroup {
				t.Fatalf("limits on a btrfs root with quotas: %+v, want %s", s.limits, LimitQgroup)
			}
			committedBase(ctx, t, s)
			m, err := s.Prepare(ctx, "limited", "base", withMaxSize(testLimit))
			if err != nil {
				t.Fatal(err)
			}
			dir := s.snapshotDir(s.idOf(ctx, t, "limited"))
			if !isSubvolume(dir) {
				t.Fatalf("%s is not a subvolume", dir)
			}
			qgroup := subvolIDOf(t, dir)
			isEDQUOT := func(err error) bool { return errors.Is(err, syscall.EDQUOT) }
			rootfs := writePastLimit(ctx, t, s, m, isEDQUOT, "EDQUOT")
			if err := os.Remove(filepath.Join(rootfs, "big")); err != nil {
				t.Fatal(err)
			}
			if err := mount.UnmountAll(rootfs, 0); err != nil {
				t.Fatal(err)
			}

			// A restart: still a subvolume, still limited, files kept.
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			ctx, s = openTest(t, root)
			if !isSubvolume(dir) {
				t.Fatalf("after a restart, %s is not a subvolume", dir)
			}
			m, err = s.Mounts(ctx, "limited")
			if err != nil {
				t.Fatal(err)
			}
			rootfs = mountAt(t, m)
			if _, err := os.Stat(filepath.Join(rootfs, "hello")); err != nil {
				t.Fatalf("after a restart: %v", err)
			}
			if err := fillUp(filepath.Join(rootfs, "big"), 2*testLimit); !errors.Is(err, syscall.EDQUOT) {
				t.Fatalf("after a restart, the limit: %v", err)
			}
			if err := mount.UnmountAll(rootfs, 0); err != nil {
				t.Fatal(err)
			}

			for _, key := range []string{"limited", "free"} {
				if err := s.Remove(ctx, key); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Close(); err != nil { // waits for the trash
				t.Fatal(err)
			}
			gone(t, dir)
			noQgroup(t, mnt, qgroup)
		})
	}
}

// noQgroup fails if qgroup is still on the filesystem on mnt once the
// kernel's cleaner has dropped every deleted subvolume.
func noQgroup(t *testing.T, mnt string, qgroup string) {
	t.Helper()
	loopfs.SubvolumeSync(t, mnt)
	if ids := loopfs.QgroupIDs(t, mnt); slices.Contains(ids, qgroup) {
		out, _ := exec.Command("sh", "-c", "btrfs qgroup show -re "+mnt+"; btrfs subvolume list -a "+mnt+"; btrfs subvolume list -d "+mnt+"; find "+mnt+" -maxdepth 3").CombinedOutput()
		t.Fatalf("qgroup %s left after its subvolume was deleted: %v\n%s", qgroup, ids, out)
	}
}

// removedClean fails unless the snapshot directory dir is gone, nothing is
// left in root's trash, and, if qgroup is set, the filesystem on mnt has
// dropped it.
func removedClean(t *testing.T, root, dir, mnt, qgroup string) {
	t.Helper()
	gone(t, dir)
	if left, _ := filepath.Glob(filepath.Join(root, trashDir, "*")); len(left) != 0 {
		t.Fatalf("left in the trash: %v", left)
	}
	if qgroup != "" {
		noQgroup(t, mnt, qgroup)
	}
}

// TestQgroupCrash: what a crash leaves of the qgroup path goes at the next
// start, subvolume and qgroup: a Prepare's new-* subvolume (killed before
// its metadata committed) and a removed snapshot's subvolume (killed
// between Remove's transaction and the move into the trash).
func TestQgroupCrash(t *testing.T) {
	root, mnt := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	td, err := s.prepareSubvolume(testLimit)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "removed", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	dir := s.snapshotDir(s.idOf(ctx, t, "removed"))
	qgroups := []string{subvolIDOf(t, td), subvolIDOf(t, dir)}
	// What Remove's transaction does, and nothing after it.
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, "removed")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, s = openTest(t, root)
	if err := s.Close(); err != nil { // waits for the trash
		t.Fatal(err)
	}
	gone(t, td, dir)
	for _, q := range qgroups {
		noQgroup(t, mnt, q)
	}
}

// TestQgroupUsageMatchesWalk is TestLimitUsageMatchesWalk on a btrfs root
// with quotas: bytes from the qgroup, inodes from the tree search.
func TestQgroupUsageMatchesWalk(t *testing.T) {
	for _, q := range quotaKinds {
		t.Run(string(q), func(t *testing.T) {
			root, _ := qgroupRoot(t, q)
			usageMatchesWalk(t, root, false)
		})
	}
}

// TestQgroupImageBackend: limit_backend = "image" keeps images on a btrfs
// root with quotas; "auto" on a btrfs root without quotas does too, and
// says which command would enable them.
func TestQgroupImageBackend(t *testing.T) {
	needLimits(t)
	root, _ := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithLimitBackend(LimitImage))
	if _, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	dir := s.snapshotDir(s.idOf(ctx, t, "limited"))
	if mounted, err := isMountPoint(dir); err != nil || !mounted || isSubvolume(dir) {
		t.Fatalf("limit_backend image: image mounted %v (%v), subvolume %v", mounted, err, isSubvolume(dir))
	}
	if err := s.Remove(ctx, "limited"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	noImagesLeft(t, root)

	plain := filepath.Join(loopfs.Mount(t, loopfs.Btrfs), "root")
	if err := os.Mkdir(plain, 0o700); err != nil {
		t.Fatal(err)
	}
	m := ProbeRootLimits(ModeOverlay, plain, LimitAuto)
	if m.Backend != LimitImage || !strings.Contains(m.Note, "btrfs quota enable "+plain) {
		t.Fatalf("a btrfs root without quotas: %+v, want the image backend and a note naming `btrfs quota enable %s`", m, plain)
	}
}

// TestQgroupInodeCountKept: the inode count kept for an idle limited
// snapshot follows every change, committed or not: creates and unlinks
// with and without a commit in between, twice in one transaction, and a
// directory tree removed; each time, once the recount the change caused
// is done, Usage's inodes equal a walk's.
func TestQgroupInodeCountKept(t *testing.T) {
	root, _ := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	recountNow(s)
	m, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit))
	if err != nil {
		t.Fatal(err)
	}
	rootfs := mountAt(t, m)
	upper := s.upperPath(s.idOf(ctx, t, "limited"))
	check := func(step string) {
		t.Helper()
		u := settledUsage(ctx, t, s, "limited")
		walk, err := cfs.DiskUsage(ctx, upper)
		if err != nil {
			t.Fatal(err)
		}
		if u.Inodes != walk.Inodes {
			t.Fatalf("%s: Usage says %d inodes, a walk %d", step, u.Inodes, walk.Inodes)
		}
	}
	sync := unix.Sync
	if err := os.MkdirAll(filepath.Join(rootfs, "d", "e"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		name := filepath.Join(rootfs, "d", "e", strconv.Itoa(i))
		if err := os.WriteFile(name, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("create %d", i))
		if i%2 == 0 {
			sync()
			check(fmt.Sprintf("create %d, committed", i))
		}
		if i%3 == 0 {
			if err := os.Remove(name); err != nil {
				t.Fatal(err)
			}
			check(fmt.Sprintf("unlink %d", i))
			check(fmt.Sprintf("unlink %d, again", i))
		}
	}
	sync()
	check("all committed")
	check("all committed, kept")
	if err := os.RemoveAll(filepath.Join(rootfs, "d")); err != nil {
		t.Fatal(err)
	}
	check("tree removed")
	sync()
	check("tree removed, committed")
}

// TestQgroupQuotasDisabled: a root whose quotas the operator turned off
// after limited snapshots were made keeps them usable: the daemon starts
// (on the image path for new limits), answers their Usage with a walk,
// and Remove still destroys their subvolumes.
func TestQgroupQuotasDisabled(t *testing.T) {
	needLimits(t)
	root, mnt := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	if _, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	dir := s.snapshotDir(s.idOf(ctx, t, "limited"))
	if err := os.WriteFile(filepath.Join(s.upperPath(s.idOf(ctx, t, "limited")), "kept"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("btrfs", "quota", "disable", mnt).CombinedOutput(); err != nil {
		t.Fatalf("btrfs quota disable: %v: %s", err, out)
	}
	ctx, s = openTest(t, root)
	if s.limits.Backend != LimitImage {
		t.Fatalf("limits after quotas were disabled: %+v, want the image path", s.limits)
	}
	u, err := s.Usage(ctx, "limited")
	if err != nil {
		t.Fatalf("Usage of a limited subvolume without quotas: %v", err)
	}
	walk, err := cfs.DiskUsage(ctx, s.upperPath(s.idOf(ctx, t, "limited")))
	if err != nil {
		t.Fatal(err)
	}
	if u != snapshots.Usage(walk) {
		t.Fatalf("Usage %+v, a walk %+v", u, walk)
	}
	if err := s.Remove(ctx, "limited"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	removedClean(t, root, dir, "", "")
}

// TestRemoveTreeSubvolume: the deleter destroys a trashed subvolume whole,
// with one ioctl: even one holding a file nobody may unlink (immutable),
// which a RemoveAll could not delete.
func TestRemoveTreeSubvolume(t *testing.T) {
	root, mnt := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	if _, err := s.Prepare(ctx, "limited", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	id := s.idOf(ctx, t, "limited")
	dir := s.snapshotDir(id)
	qgroup := subvolIDOf(t, dir)
	f, err := os.Create(filepath.Join(s.upperPath(id), "immutable"))
	if err != nil {
		t.Fatal(err)
	}
	err = unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, 0x10) // FS_IMMUTABLE_FL, linux/fs.h
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "limited"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // waits for the trash
		t.Fatal(err)
	}
	removedClean(t, root, dir, mnt, qgroup)
}

// TestQgroupLostRename: a power cut that lost a limited snapshot's
// subvolume (the metadata names it) gets a new one, limited, at start.
func TestQgroupLostRename(t *testing.T) {
	root, _ := qgroupRoot(t, loopfs.Qgroups)
	dir := closedLimited(t, root)
	if err := removeTree(dir); err != nil {
		t.Fatal(err)
	}
	ctx, s := openTest(t, root)
	if !isSubvolume(dir) {
		t.Fatalf("the lost directory %s was not made again as a subvolume", dir)
	}
	if err := fillUp(filepath.Join(bindSource(ctx, t, s, "limited"), "big"), 2*testLimit); !errors.Is(err, syscall.EDQUOT) {
		t.Fatalf("after the lost rename, the limit: %v", err)
	}
}

// TestQgroupProbeWithoutSysfs: a daemon that cannot see /sys/fs/btrfs (in
// a container without the host's sysfs) cannot tell whether the root's
// quotas are enabled. It keeps the image path, and its note says that
// sysfs is what it lacks, not that quotas are off: `btrfs quota enable`
// would change nothing there.
func TestQgroupProbeWithoutSysfs(t *testing.T) {
	root, _ := qgroupRoot(t, loopfs.Qgroups)
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	type result struct {
		m   LimitMechanism
		err error
	}
	done := make(chan result)
	go func() {
		// Never unlocked: the thread, moved to a mount namespace of
		// its own, ends with this goroutine.
		runtime.LockOSThread()
		err := unix.Unshare(unix.CLONE_NEWNS)
		if err == nil {
			err = unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, "")
		}
		if err == nil {
			err = unix.Mount("tmpfs", "/sys", "tmpfs", 0, "")
		}
		if err != nil {
			done <- result{err: fmt.Errorf("a mount namespace with an empty /sys: %w", err)}
			return
		}
		done <- result{m: ProbeRootLimits(ModeOverlay, root, LimitAuto)}
	}()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.m.Backend == LimitQgroup || strings.Contains(r.m.Note, "quota enable") || !strings.Contains(r.m.Note, "/sys/fs/btrfs") {
		t.Fatalf("limits on a btrfs root with quotas, /sys/fs/btrfs out of sight: %+v; want the image path and a note naming /sys/fs/btrfs, not one asking to enable quotas", r.m)
	}
	t.Logf("note: %s", r.m.Note)
}
