package snapshotter

import (
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay/overlayutils"
	cfs "github.com/containerd/continuity/fs"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
)

// TestQgroupMeasure is TestLimitMeasure on a btrfs root with qgroups
// enabled, overclone and the built-in on the same filesystem, in one run
// (on request: OVERCLONE_MEASURE_LIMITS=1):
//
//   - Usage of a limited active holding 100k small files, and its two
//     parts: the qgroup's sysfs counters (bytes) and the tree search that
//     counts inodes, against a walk of the same upper (continuity's
//     DiskUsage) and the built-in's Usage (its walk) of the same files;
//   - Prepare with a limit (a subvolume and its qgroup limit) against
//     Prepare without, and the built-in's; Remove with and without;
//   - the CPU of a poll of 200 limited actives' Usage (500 files each)
//     against the built-in's.
//
// It reports; its only assertions are that the calls work.
func TestQgroupMeasure(t *testing.T) {
	if os.Getenv(measureEnv) == "" {
		t.Skipf("a measurement run: set %s=1", measureEnv)
	}
	root, mnt := qgroupRoot(t, loopfs.Qgroups)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	biOpts := []overlay.Opt{overlay.AsynchronousRemove}
	if ok, err := overlayutils.SupportsIDMappedMounts(); err == nil && ok {
		biOpts = append(biOpts, overlay.WithRemapIDs)
	}
	bi, err := overlay.NewSnapshotter(filepath.Join(mnt, "builtin"), biOpts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bi.Close() })

	files := 100_000
	if os.Getenv(measureEnv) == "prepare" {
		files = 1000
	}
	if _, err := s.Prepare(ctx, "big", "", withMaxSize(2<<30)); err != nil {
		t.Fatal(err)
	}
	upper := bindSource(ctx, t, s, "big")
	writeSmallFiles(t, upper, files)
	m, err := bi.Prepare(ctx, "big", "")
	if err != nil {
		t.Fatal(err)
	}
	writeSmallFiles(t, m[0].Source, files)
	syscall.Sync()
	dir := s.snapshotDir(s.idOf(ctx, t, "big"))
	fd, id := openSubvol(t, dir)
	defer unix.Close(fd)
	qg := filepath.Join(s.quotas.sysfs, "qgroups", "0_"+strconv.FormatUint(id, 10), "referenced")
	// After the sync the count is kept: the idle container's Usage.
	ours := timeCalls(t, 200, func() error { _, err := s.Usage(ctx, "big"); return err })
	sysfs := timeCalls(t, 200, func() error { _, err := readSysfsInt(qg); return err })
	search := timeCalls(t, 50, func() error { _, _, err := btrfsCountInodes(ctx, fd, id); return err })
	walk := timeCalls(t, 5, func() error { _, err := cfs.DiskUsage(ctx, upper); return err })
	theirs := timeCalls(t, 5, func() error { _, err := bi.Usage(ctx, "big"); return err })
	t.Logf("Usage, %d files: overclone qgroup-limited, idle (inode count kept) %v median, %.0fx faster than the built-in; its parts: qgroup sysfs %v, inode count by a tree search (what a changed tree costs) %v (%.1fx faster than the built-in); a walk of the same upper %v, built-in %v",
		files, ours, float64(theirs)/float64(ours), sysfs, search, float64(theirs)/float64(search), walk, theirs)

	var withLimit, without, builtinPrepare, removeLimited, removePlain []time.Duration
	for i := range 20 {
		k := strconv.Itoa(i)
		withLimit = append(withLimit, timeOnce(t, func() error { _, err := s.Prepare(ctx, "l"+k, "", withMaxSize(1<<30)); return err }))
		without = append(without, timeOnce(t, func() error { _, err := s.Prepare(ctx, "p"+k, ""); return err }))
		builtinPrepare = append(builtinPrepare, timeOnce(t, func() error { _, err := bi.Prepare(ctx, "p"+k, ""); return err }))
	}
	for i := range 20 {
		k := strconv.Itoa(i)
		removeLimited = append(removeLimited, timeOnce(t, func() error { return s.Remove(ctx, "l"+k) }))
		removePlain = append(removePlain, timeOnce(t, func() error { return s.Remove(ctx, "p"+k) }))
	}
	t.Logf("Prepare: overclone with a 1 GiB label (subvolume + qgroup limit) %v (%.2fx), without %v, built-in %v; Remove: with a limit %v, without %v",
		median(withLimit), float64(median(withLimit))/float64(median(without)),
		median(without), median(builtinPrepare), median(removeLimited), median(removePlain))

	const actives, each = 200, 500
	for i := range actives {
		k := "c" + strconv.Itoa(i)
		if _, err := s.Prepare(ctx, k, "", withMaxSize(MinMaxSize)); err != nil {
			t.Fatal(err)
		}
		writeSmallFiles(t, bindSource(ctx, t, s, k), each)
		m, err := bi.Prepare(ctx, k, "")
		if err != nil {
			t.Fatal(err)
		}
		writeSmallFiles(t, m[0].Source, each)
	}
	syscall.Sync()
	poll := func(sn snapshots.Snapshotter) time.Duration { return pollCPU(ctx, t, sn, actives) }
	// The first poll counts every tree (none is kept yet), the next
	// reuses the counts of the idle ones: every one here.
	firstCPU, limitedCPU, builtinCPU := poll(s), poll(s), poll(bi)
	t.Logf("poll of %d actives (%d files each), CPU per poll and share of one core every 10 s: overclone qgroup-limited, idle %v (%s), each tree searched %v (%s), built-in %v (%s)",
		actives, each, limitedCPU, coreShare(limitedCPU), firstCPU, coreShare(firstCPU), builtinCPU, coreShare(builtinCPU))
}
