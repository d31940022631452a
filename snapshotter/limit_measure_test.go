package snapshotter

import (
	"fmt"
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
)

// measureEnv asks for TestLimitMeasure: it makes 300k files and 200 loop
// mounts, about two minutes of both cores, so it runs on request only;
// "prepare" gives the Prepare figures alone, in seconds.
const measureEnv = "OVERCLONE_MEASURE_LIMITS"

// TestLimitMeasure measures, in one run and side by side with
// containerd's built-in overlayfs snapshotter as it ships (as test/builtin
// opens it),
// what the targets name:
//
//   - Usage of an active snapshot holding 100k small files: overclone's
//     limited one (its image's statfs) against the built-in's walk;
//   - Prepare with a limit against Prepare without (overclone's and the
//     built-in's): a size never asked for (cold), one with a template
//     but no image ready, one asked for before (warm, pooled) and
//     default_max_size (pooled); and Remove with a limit;
//   - the CPU one poll of 200 actives' Usage costs, as a share of one core
//     if repeated every 10 s as CRI does: overclone limited, overclone
//     unlimited with usage_max_age 30s (one walk in three polls), and the
//     built-in (a walk each time).
//
// It reports; its only assertions are that the calls work.
func TestLimitMeasure(t *testing.T) {
	if os.Getenv(measureEnv) == "" {
		t.Skipf("a measurement run: set %s=1", measureEnv)
	}
	needLimits(t)
	ctx, s := openTest(t, limitRoot(t), WithMode(ModeOverlay))
	// As test/builtin opens it (which imports this package): the
	// options containerd's plugin passes with an empty config.
	biOpts := []overlay.Opt{overlay.AsynchronousRemove}
	if ok, err := overlayutils.SupportsIDMappedMounts(); err == nil && ok {
		biOpts = append(biOpts, overlay.WithRemapIDs)
	}
	bi, err := overlay.NewSnapshotter(t.TempDir(), biOpts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bi.Close() })

	// Usage of 100k files.
	files := 100_000
	if os.Getenv(measureEnv) == "prepare" {
		files = 1000 // the Prepare figures, quickly, and no poll
	}
	if _, err := s.Prepare(ctx, "big", "", withMaxSize(2<<30)); err != nil {
		t.Fatal(err)
	}
	writeSmallFiles(t, bindSource(ctx, t, s, "big"), files)
	m, err := bi.Prepare(ctx, "big", "")
	if err != nil {
		t.Fatal(err)
	}
	writeSmallFiles(t, m[0].Source, files)
	syscall.Sync()
	ours := timeCalls(t, 200, func() error { _, err := s.Usage(ctx, "big"); return err })
	theirs := timeCalls(t, 5, func() error { _, err := bi.Usage(ctx, "big"); return err })
	t.Logf("Usage, %d files: overclone limited %v median, built-in walk %v median: %.0fx faster",
		files, ours, theirs, float64(theirs)/float64(ours))

	// Prepare with and without a limit, interleaved, and Remove:
	//   - cold: a label of a size not asked for before, which makes its
	//     template (mkfs.ext4) and its image in the call;
	//   - template only: a label of a size asked for before but since
	//     pushed out of the pool by others (or before a restart): its
	//     image is copied from its template and mounted in the call;
	//   - warm: a label of one size (1 GiB) asked for again, whose images
	//     the pool keeps ready once the first asked for it;
	//   - default_max_size (1 GiB, pooled from the start, on a second
	//     snapshotter).
	// A container start is not a Prepare every millisecond: each timed
	// Prepare starts with the pools caught up (no refill running), as a
	// node's pace would let them, and the Prepare without a limit of the
	// same round comes first, so that no refill weighs on it either.
	ctx, pooled := openTest(t, limitRoot(t), WithMode(ModeOverlay), WithDefaultMaxSize(1<<30))
	settle := func() { s.pool.wait(); pooled.pool.wait() }
	const rounds = 12 // cold sizes stay under maxTemplates
	var cold, coldWithout, tmplOnly, tmplWithout, warm, fromPool, without, builtinPrepare, removeLimited, removePlain []time.Duration
	for i := range rounds {
		k := strconv.Itoa(i)
		settle()
		coldWithout = append(coldWithout, timeOnce(t, func() error { _, err := s.Prepare(ctx, "q"+k, ""); return err }))
		cold = append(cold, timeOnce(t, func() error {
			_, err := s.Prepare(ctx, "n"+k, "", withMaxSize(1<<30+int64(i+1)<<20))
			return err
		}))
	}
	// The pool now holds the last poolSizes cold sizes; the first ones
	// have a template and nothing ready.
	for i := range rounds - poolSizes {
		k := strconv.Itoa(i)
		size := 1<<30 + int64(i+1)<<20
		settle()
		if _, err := os.Lstat(s.templates.path(size)); err != nil {
			t.Fatalf("size %d has no template: %v", size, err)
		}
		tmplWithout = append(tmplWithout, timeOnce(t, func() error { _, err := s.Prepare(ctx, "r"+k, ""); return err }))
		tmplOnly = append(tmplOnly, timeOnce(t, func() error {
			_, err := s.Prepare(ctx, "t"+k, "", withMaxSize(size))
			return err
		}))
	}
	if _, err := s.Prepare(ctx, "first-of-1g", "", withMaxSize(1<<30)); err != nil {
		t.Fatal(err)
	}
	for i := range rounds {
		k := strconv.Itoa(i)
		settle()
		without = append(without, timeOnce(t, func() error { _, err := s.Prepare(ctx, "p"+k, ""); return err }))
		builtinPrepare = append(builtinPrepare, timeOnce(t, func() error { _, err := bi.Prepare(ctx, "p"+k, ""); return err }))
		warm = append(warm, timeOnce(t, func() error { _, err := s.Prepare(ctx, "l"+k, "", withMaxSize(1<<30)); return err }))
		settle()
		fromPool = append(fromPool, timeOnce(t, func() error { _, err := pooled.Prepare(ctx, "d"+k, ""); return err }))
	}
	for i := range rounds {
		k := strconv.Itoa(i)
		removeLimited = append(removeLimited, timeOnce(t, func() error { return s.Remove(ctx, "l"+k) }))
		removePlain = append(removePlain, timeOnce(t, func() error { return s.Remove(ctx, "p"+k) }))
	}
	ratio := func(ds []time.Duration) string {
		return fmt.Sprintf("%v (%.1fx)", median(ds), float64(median(ds))/float64(median(without)))
	}
	t.Logf("Prepare: overclone with a label of a new size (cold) %v (%.1fx overclone's %v without, in the same rounds); of a size with a template, not pooled %v (%.1fx %v without); of a size asked for before (warm, pooled) %s, with default_max_size (pooled) %s, without %v, built-in %v; Remove: with a limit %v, without %v",
		median(cold), float64(median(cold))/float64(median(coldWithout)), median(coldWithout),
		median(tmplOnly), float64(median(tmplOnly))/float64(median(tmplWithout)), median(tmplWithout),
		ratio(warm), ratio(fromPool), median(without), median(builtinPrepare), median(removeLimited), median(removePlain))
	if os.Getenv(measureEnv) == "prepare" {
		return
	}

	// A poll of 200 actives, 500 files each.
	const actives, each = 200, 500
	_, cached := openTest(t, t.TempDir(), WithMode(ModeOverlay), WithUsageMaxAge(30*time.Second))
	for i := range actives {
		k := "c" + strconv.Itoa(i)
		if _, err := s.Prepare(ctx, k, "", withMaxSize(MinMaxSize)); err != nil {
			t.Fatal(err)
		}
		writeSmallFiles(t, bindSource(ctx, t, s, k), each)
		if _, err := cached.Prepare(ctx, k, ""); err != nil {
			t.Fatal(err)
		}
		writeSmallFiles(t, bindSource(ctx, t, cached, k), each)
		m, err := bi.Prepare(ctx, k, "")
		if err != nil {
			t.Fatal(err)
		}
		writeSmallFiles(t, m[0].Source, each)
	}
	syscall.Sync()
	poll := func(sn snapshots.Snapshotter) time.Duration { return pollCPU(ctx, t, sn, actives) }
	limitedCPU := poll(s)
	builtinCPU := poll(bi)
	cachedCPU := (poll(cached) + poll(cached) + poll(cached)) / 3 // one walk, two answers from it
	t.Logf("poll of %d actives (%d files each), CPU per poll and share of one core every 10 s: overclone limited %v (%s), overclone unlimited with usage_max_age 30s %v (%s), built-in %v (%s)",
		actives, each, limitedCPU, coreShare(limitedCPU), cachedCPU, coreShare(cachedCPU), builtinCPU, coreShare(builtinCPU))
}

// writeSmallFiles writes n files of 100 bytes under dir, 1000 per directory.
func writeSmallFiles(t *testing.T, dir string, n int) {
	t.Helper()
	data := make([]byte, 100)
	for i := range n {
		sub := filepath.Join(dir, strconv.Itoa(i/1000))
		if i%1000 == 0 {
			if err := os.Mkdir(sub, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(sub, strconv.Itoa(i)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func timeOnce(t *testing.T, f func() error) time.Duration {
	t.Helper()
	start := time.Now()
	if err := f(); err != nil {
		t.Fatal(err)
	}
	return time.Since(start)
}

func timeCalls(t *testing.T, n int, f func() error) time.Duration {
	t.Helper()
	var ds []time.Duration
	for range n {
		ds = append(ds, timeOnce(t, f))
	}
	return median(ds)
}

func median(ds []time.Duration) time.Duration {
	ds = slices.Clone(ds)
	slices.Sort(ds)
	return ds[len(ds)/2]
}

// cpuOf is the CPU time (user and system) this process spent in f.
func cpuOf(t *testing.T, f func() error) time.Duration {
	t.Helper()
	var before, after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	if err := f(); err != nil {
		t.Fatal(err)
	}
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	cpu := func(r syscall.Rusage) time.Duration {
		return time.Duration(r.Utime.Nano() + r.Stime.Nano())
	}
	return cpu(after) - cpu(before)
}
