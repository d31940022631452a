package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPoolCovers: a daemon with default_max_size keeps one image of each
// cover class from the start, and a Prepare of a size never asked for
// anywhere from 32 MiB to 128 GiB takes one (its cover's count drops) held
// to the limit by its reserve, and the limit holds; a limit asked for
// again takes an image of its class kept for it. After a restart with no
// default and a limited snapshot present, the covers are back.
func TestPoolCovers(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	start := time.Now()
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(testLimit), withCovers())
	under := underMounts(t, root)
	checkCovers := func(when string) {
		t.Helper()
		s.pool.wait()
		if !start.IsZero() {
			t.Logf("%s: the pool filled %v after the start", when, time.Since(start))
			start = time.Time{}
		}
		s.pool.mu.Lock()
		for i, ps := range s.pool.covers {
			if ps.size != coverClasses[i] || len(ps.ready) != 1 {
				t.Fatalf("%s: %d images of the %d MiB cover ready, want 1 of %d MiB", when, len(ps.ready), ps.size>>20, coverClasses[i]>>20)
			}
		}
		s.pool.mu.Unlock()
		// What a cover costs the host's disk: its image file's blocks.
		s.pool.mu.Lock()
		for _, ps := range s.pool.covers {
			var st unix.Stat_t
			if err := unix.Stat(ps.ready[0].path, &st); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: the %d MiB cover's image file holds %d KiB", when, ps.size>>20, st.Blocks*512>>10)
		}
		s.pool.mu.Unlock()
	}
	// take prepares a limit of size, which an image of class c (the
	// smallest pooled that serves it) must serve, with no refill between.
	take := func(when string, size, c int64) {
		t.Helper()
		defer holdRefills(&s.pool)()
		key := when + "-" + strconv.FormatInt(size>>20, 10)
		before := s.pool.readyOf(c)
		if _, err := s.Prepare(ctx, key, "", withMaxSize(size)); err != nil {
			t.Fatal(err)
		}
		if n := s.pool.readyOf(c); before < 1 || n != before-1 {
			t.Fatalf("%s: a limit of %d MiB left %d images of class %d MiB ready of %d; want one taken", when, size>>20, n, c>>20, before)
		}
		checkPooledLimit(ctx, t, s, under, key, c, size)
	}
	// takeCovers prepares each limit of sizes, the i-th from the i-th
	// cover's class.
	takeCovers := func(when string, sizes []int64) {
		t.Helper()
		for i, size := range sizes {
			take(when, size, coverClasses[i])
		}
	}

	checkCovers("after a start with default_max_size")
	// The smallest limits each cover serves, or near them, then the
	// largest: none served by a limit asked for before.
	takeCovers("low", []int64{65 << 20, 129 << 20, 513 << 20, 3 << 30, 20 << 30, 33 << 30})
	s.pool.refill(ctx)
	checkCovers("after the refill")
	takeCovers("high", []int64{120 << 20, 500 << 20, 2 << 30, 7 << 30, 15 << 30, 128 << 30})
	s.pool.refill(ctx)
	s.pool.wait()

	// Asked for again: an image of the limit's own class, which the
	// first time asked for.
	for _, size := range []int64{7 << 30, 15 << 30, 128 << 30} {
		take("again", size, sizeClass(size))
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	ctx, s = openTest(t, root, withCovers())
	checkCovers("after a restart without default_max_size")
	take("after-restart", 60<<30, 128<<30)
}

// checkPooledLimit checks that key's image is one of class from the pool
// held to limit: its limit recorded, and its reserve such that what ext4
// can allocate, all that the image can take of the host's disk, is at
// most limit, and so is the image file; a limit up to 128 MiB is written
// past (ENOSPC), and what was written removed, which frees its blocks in
// the image file too.
func checkPooledLimit(ctx context.Context, t *testing.T, s *Snapshotter, under, key string, class, limit int64) {
	t.Helper()
	size, _ := imageFile(ctx, t, s, under, key)
	dir := s.snapshotDir(s.idOf(ctx, t, key))
	if recorded := limitRecord(t, dir); size != class || recorded != limit {
		t.Fatalf("%s: image of %d bytes, limit %d recorded; want a pooled one of %d held to %d", key, size, recorded, class, limit)
	}
	if reserve := reserveAt(t, dir); reserve != reserveFor(class, limit) || class-reserve*reserveBlock > limit {
		t.Fatalf("%s: a reserve of %d clusters in a %d-byte image; want %d, leaving at most %d", key, reserve, class, reserveFor(class, limit), limit)
	}
	if limit <= 128<<20 {
		big := filepath.Join(s.upperPath(s.idOf(ctx, t, key)), "big")
		if err := fillUp(big, 2*limit); !isFull(err) {
			t.Fatalf("%s: writing past %d bytes: %v, want ENOSPC", key, limit, err)
		}
		defer func() {
			// What the container frees goes back to the host: once the
			// journal has committed the removal, ext4 issues the
			// discards from a workqueue, so shortly after the sync.
			if err := os.Remove(big); err != nil {
				t.Fatal(err)
			}
			syscall.Sync()
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				_, allocated := imageFile(ctx, t, s, under, key)
				if allocated <= limit/2 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s: 10 s after its big file was removed, the image file holds %d bytes of a %d limit", key, allocated, limit)
				}
			}
		}()
	}
	if _, allocated := imageFile(ctx, t, s, under, key); allocated > limit {
		t.Fatalf("%s: the image file holds %d bytes, past its limit %d", key, allocated, limit)
	}
}

// TestPoolNoLimits: a daemon that never sees a limit pools nothing: no
// image file, no mount, no loop device, before and after a restart.
func TestPoolNoLimits(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	for _, when := range []string{"after a start", "after a restart"} {
		ctx, s := openTest(t, root, WithMode(ModeOverlay), withCovers())
		committedBase(ctx, t, s)
		if _, err := s.Prepare(ctx, "container", "base"); err != nil {
			t.Fatal(err)
		}
		s.pool.wait()
		s.pool.mu.Lock()
		covers := len(s.pool.covers)
		s.pool.mu.Unlock()
		if covers != 0 {
			t.Fatalf("%s: %d covers pooled with no limit in use", when, covers)
		}
		if files, _ := filepath.Glob(filepath.Join(root, templatesDir, "*")); len(files) != 0 {
			t.Fatalf("%s: image files with no limit in use: %v", when, files)
		}
		if left := imagesLeft(t, root); len(left) != 0 {
			t.Fatalf("%s: mounts or loop devices with no limit in use: %v", when, left)
		}
		for _, key := range []string{"container", "base"} {
			if err := s.Remove(ctx, key); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
