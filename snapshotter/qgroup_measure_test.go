package snapshotter

import (
	"os"
	"path/filepath"
	"slices"
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
//   - Usage of a limited active holding 100k small files: idle (its count
//     kept), and after its tree changed (answered from the last count, a
//     recount started in the background, or already waiting for its
//     interval); its parts, the qgroup's sysfs counters (bytes) and the
//     tree search that counts inodes (what a recount costs, off the call);
//     against a walk of the same upper (continuity's DiskUsage) and the
//     built-in's Usage (its walk) of the same files;
//   - Prepare with a limit (a subvolume and its qgroup limit) against
//     Prepare without, and the built-in's; Remove with and without;
//   - the CPU of polls of 200 limited actives' Usage (500 files each),
//     background recounts included, idle and with every tree changed
//     between polls, against the built-in's.
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
	// The tree changed since the last count, which is due again: Usage
	// answers from it and starts the recount (each waited for before the
	// next change). Then, with the daemon's interval, changes within it:
	// the recount started by the first waits for the interval.
	interval := s.quotas.counts.interval
	setRecountInterval(s, 0)
	var changed, pending []time.Duration
	for i := range 21 {
		waitRecount(s, dir)
		touch(t, filepath.Join(upper, "changed"+strconv.Itoa(i)))
		changed = append(changed, timeOnce(t, func() error { _, err := s.Usage(ctx, "big"); return err }))
	}
	waitRecount(s, dir)
	setRecountInterval(s, interval)
	for i := range 21 {
		touch(t, filepath.Join(upper, "pending"+strconv.Itoa(i)))
		pending = append(pending, timeOnce(t, func() error { _, err := s.Usage(ctx, "big"); return err }))
	}
	t.Logf("Usage, %d files: overclone qgroup-limited, idle (inode count kept) %v median, %.0fx faster than the built-in; tree changed, recount due (started in the background) %v median (max %v), %.0fx faster; tree changed, recount waiting for its %v interval %v median; its parts: qgroup sysfs %v, inode count by a tree search (a recount, off the call) %v (%.1fx faster than the built-in); a walk of the same upper %v, built-in %v",
		files, ours, float64(theirs)/float64(ours), median(changed), slices.Max(changed), float64(theirs)/float64(median(changed)),
		interval, median(pending), sysfs, search, float64(theirs)/float64(search), walk, theirs)

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
	uppers, dirs := make([]string, actives), make([]string, actives)
	for i := range actives {
		k := "c" + strconv.Itoa(i)
		uppers[i], dirs[i] = bindSource(ctx, t, s, k), s.snapshotDir(s.idOf(ctx, t, k))
	}
	waitAll := func() {
		for _, d := range dirs {
			waitRecount(s, d)
		}
	}
	round := 0
	changeAll := func() { // a file more in every upper, not timed
		round++
		for _, u := range uppers {
			touch(t, filepath.Join(u, "poll"+strconv.Itoa(round)))
		}
	}
	poll := func(sn snapshots.Snapshotter) time.Duration { return pollCPU(ctx, t, sn, actives) }
	// The first poll counts every tree, inline (the first Usage of each
	// after Prepare or a restart); the next reuses the counts.
	firstCPU := poll(s)
	waitAll()
	idleCPU := poll(s)
	waitAll()
	// Every tree changed between polls. A poll whose recounts are all
	// due: the poll and the 200 recounts it starts (CPU of the whole
	// process, so the background counts are in it).
	setRecountInterval(s, 0)
	changeAll()
	dueCPU := cpuOf(t, func() error {
		for i := range actives {
			if _, err := s.Usage(ctx, "c"+strconv.Itoa(i)); err != nil {
				return err
			}
		}
		waitAll()
		return nil
	})
	// With the daemon's interval the next polls find the trees changed
	// again and the recounts not due: the first schedules one each, the
	// others find it waiting.
	setRecountInterval(s, interval)
	changeAll()
	schedCPU := poll(s)
	changeAll()
	pendingCPU := poll(s)
	builtinCPU := poll(bi)
	// CRI polls every 10 s: in one interval, a poll that starts the
	// recounts (or whose timers run them), and interval/10s - 1 polls
	// that find them waiting.
	polls := int64(interval / (10 * time.Second))
	worst := dueCPU + time.Duration(polls-1)*pendingCPU
	perPoll := worst / time.Duration(polls)
	t.Logf("poll of %d actives (%d files each), CPU per poll and share of one core every 10 s: overclone qgroup-limited, idle %v (%s); every tree changed between polls: recounts due %v (poll and 200 recounts, %s if every poll recounted), scheduling them %v, waiting for the interval %v; with the %v interval, CPU per 10 s %v (%s); first poll, every tree counted inline %v (%s); built-in %v (%s)",
		actives, each, idleCPU, coreShare(idleCPU), dueCPU, coreShare(dueCPU), schedCPU, pendingCPU,
		interval, perPoll, coreShare(perPoll), firstCPU, coreShare(firstCPU), builtinCPU, coreShare(builtinCPU))
}

// touch writes a small file named name.
func touch(t *testing.T, name string) {
	t.Helper()
	if err := os.WriteFile(name, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// setRecountInterval sets how long s waits between two counts of one
// snapshot's inodes (measurements: 0 makes every recount due).
func setRecountInterval(s *Snapshotter, d time.Duration) {
	c := &s.quotas.counts
	c.mu.Lock()
	c.interval = d
	c.mu.Unlock()
}
