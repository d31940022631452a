package snapshotter

import (
	"context"
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
	"golang.org/x/sys/unix"
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
//     built-in's, in the same rounds): a size never asked for, served by
//     a cover (new size; 1-1.5 GiB, and big: 20 and 60 GiB), one asked
//     for before (its class pooled: 1 GiB and 60 GiB) and
//     default_max_size; and Remove with a limit;
//   - what the pool's refill pays per image of each cover class (the
//     template's copy and its mount), what a take pays to set the
//     reserve, what
//     the image file then holds of the host's disk, and what share of a
//     limit a container can write, in an image made at the limit and in
//     images of the classes that serve it;
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
	ctx, s := openTest(t, limitRoot(t), WithMode(ModeOverlay), withCovers())
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

	// Prepare with and without a limit, interleaved, and Remove. Each
	// round times a Prepare without a limit (overclone's, then the
	// built-in's) and one with, of a kind:
	//   - new size: a size never asked for, 1-1.5 GiB, 20 GiB and 60 GiB,
	//     each round's a MiB less than the last: the first round takes the
	//     cover serving it (2, 32 and 128 GiB), later rounds its class's
	//     images, which the first asked for; either way the take sets the
	//     reserve for the size, a cost that does not depend on it;
	//   - asked before: one size (1 GiB, 60 GiB) asked for again;
	//   - default_max_size (1 GiB, and 64 GiB, on two more snapshotters).
	// A container start is not a Prepare every millisecond: each timed
	// Prepare starts with the pools caught up (no refill running), as a
	// node's pace would let them, and the Prepares without a limit of the
	// same round come first, so that no refill weighs on them either.
	ctx, pooled := openTest(t, limitRoot(t), WithMode(ModeOverlay), WithDefaultMaxSize(1<<30), withCovers())
	ctx, pooledBig := openTest(t, limitRoot(t), WithMode(ModeOverlay), WithDefaultMaxSize(64<<30), withCovers())
	settle := func() { s.pool.wait(); pooled.pool.wait(); pooledBig.pool.wait() }
	const rounds = 12
	type kind struct {
		name                  string
		limited, plain, their []time.Duration
	}
	measure := func(k *kind, i int, sn *Snapshotter, prefix string, opts ...snapshots.Opt) {
		key := prefix + strconv.Itoa(i)
		settle()
		k.plain = append(k.plain, timeOnce(t, func() error { _, err := s.Prepare(ctx, key+"-plain", ""); return err }))
		k.their = append(k.their, timeOnce(t, func() error { _, err := bi.Prepare(ctx, key+"-plain", ""); return err }))
		k.limited = append(k.limited, timeOnce(t, func() error { _, err := sn.Prepare(ctx, key, "", opts...); return err }))
	}
	newSize, new20, new60 := &kind{name: "new size 1-1.5 GiB, from a cover"}, &kind{name: "new size 20 GiB, from a cover"}, &kind{name: "new size 60 GiB, from a cover"}
	warm, warm60 := &kind{name: "asked before, 1 GiB"}, &kind{name: "asked before, 60 GiB"}
	fromDefault, fromBigDefault := &kind{name: "default_max_size 1 GiB"}, &kind{name: "default_max_size 64 GiB"}
	for i := range rounds {
		less := int64(i+1) << 20
		measure(newSize, i, s, "new", withMaxSize(1536<<20-less))
		measure(new20, i, s, "new20-", withMaxSize(20<<30-less))
		measure(new60, i, s, "new60-", withMaxSize(60<<30-less))
	}
	for _, size := range []int64{1 << 30, 60 << 30} {
		if _, err := s.Prepare(ctx, "first-of-"+strconv.FormatInt(size>>30, 10)+"g", "", withMaxSize(size)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range rounds {
		measure(warm, i, s, "warm", withMaxSize(1<<30))
		measure(warm60, i, s, "warm60-", withMaxSize(60<<30))
		measure(fromDefault, i, pooled, "default")
		measure(fromBigDefault, i, pooledBig, "big-default")
	}
	var removeLimited, removePlain []time.Duration
	for i := range rounds {
		k := strconv.Itoa(i)
		removeLimited = append(removeLimited, timeOnce(t, func() error { return s.Remove(ctx, "warm"+k) }))
		removePlain = append(removePlain, timeOnce(t, func() error { return s.Remove(ctx, "warm"+k+"-plain") }))
	}
	for _, k := range []*kind{newSize, new20, new60, warm, warm60, fromDefault, fromBigDefault} {
		r := float64(median(k.limited)) / float64(median(k.plain))
		verdict := "met"
		if r > 1.5 {
			verdict = fmt.Sprintf("missed by %.2fx", r/1.5)
		}
		t.Logf("Prepare, %s: %v, %.2fx overclone's %v without in the same rounds (built-in %v; %.2fx it); target 1.5x: %s",
			k.name, median(k.limited), r, median(k.plain), median(k.their), float64(median(k.limited))/float64(median(k.their)), verdict)
	}
	t.Logf("Remove: with a limit %v, without %v", median(removeLimited), median(removePlain))

	// The refill's cost per image of each cover class, what the image
	// file then holds, and what a take from it pays to hold it to a
	// quarter of it and to all of it.
	for _, class := range coverClasses {
		var made, primed, quarter, whole []time.Duration
		var held []int64
		for range 4 {
			var img *loopImage
			path := filepath.Join(t.TempDir(), "image")
			if _, err := s.templates.ensure(ctx, class); err != nil {
				t.Fatal(err)
			}
			made = append(made, timeOnce(t, func() error {
				var err error
				img, err = makeImage(ctx, &s.templates, path, class)
				return err
			}))
			primed = append(primed, timeOnce(t, func() error { return primeLimit(img.mnt) }))
			var st unix.Stat_t
			if err := unix.Stat(path, &st); err != nil {
				t.Fatal(err)
			}
			held = append(held, st.Blocks*512)
			quarter = append(quarter, timeOnce(t, func() error { return setLimit(img.mnt, class, class/classSpan, true) }))
			whole = append(whole, timeOnce(t, func() error { return setLimit(img.mnt, class, class, true) }))
			img.close()
		}
		t.Logf("refill, one cover of class %d MiB: template copy and mount %v, primed %v, image file %d KiB on disk; take, the limit recorded and the reserve set for a quarter of the class %v, for all of it %v (medians of 4)",
			class>>20, median(made), median(primed), slices.Max(held)>>10, median(quarter), median(whole))
	}
	for _, limit := range []int64{100 << 20, 1 << 30, 3 << 30, 10 << 30} {
		line := fmt.Sprintf("room of a %d MiB limit: made at the limit %s", limit>>20, roomShare(ctx, t, s, limit, limit))
		for c := sizeClass(limit); serves(c, limit); c *= 2 {
			line += fmt.Sprintf(", class %d MiB %s", c>>20, roomShare(ctx, t, s, c, limit))
		}
		t.Log(line)
	}
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

// roomShare is what a container can write under a limit in a new image of
// class bytes (held to limit by its reserve when class is larger), as
// bytes and a share of the limit.
func roomShare(ctx context.Context, t *testing.T, s *Snapshotter, class, limit int64) string {
	t.Helper()
	img, err := makeImage(ctx, &s.templates, filepath.Join(t.TempDir(), "image"), class)
	if err != nil {
		t.Fatal(err)
	}
	defer img.close()
	if class != limit {
		if err := setLimit(img.mnt, class, limit, true); err != nil {
			t.Fatal(err)
		}
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(img.mnt, &st); err != nil {
		t.Fatal(err)
	}
	room := int64(st.Bavail) * st.Bsize
	return fmt.Sprintf("%d MiB (%.1f%%)", room>>20, 100*float64(room)/float64(limit))
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
