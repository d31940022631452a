package snapshotter

import (
	"context"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPoolCovers: a daemon with default_max_size keeps one image of each
// cover class from the start, and a Prepare of a size never asked for
// anywhere from 32 MiB to 128 GiB takes one (its cover's count drops) cut
// back to the limit, which holds; a limit asked for again takes an image
// whose ballast is cut for it already, and cuts nothing. After a restart
// with no default and a limited snapshot present, the covers are back.
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
		for _, c := range coverClasses {
			if n := s.pool.readyOf(c, c/classSpan); n != 1 {
				t.Fatalf("%s: %d images of the %d MiB cover ready, want 1", when, n, c>>20)
			}
		}
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
	// takeCovers prepares each limit of sizes with no refill between,
	// the i-th from the i-th cover.
	takeCovers := func(when string, sizes []int64) {
		t.Helper()
		defer holdRefills(&s.pool)()
		for i, size := range sizes {
			c := coverClasses[i]
			key := when + "-" + strconv.FormatInt(size>>20, 10)
			if _, err := s.Prepare(ctx, key, "", withMaxSize(size)); err != nil {
				t.Fatal(err)
			}
			if n := s.pool.readyOf(c, c/classSpan); n != 0 {
				t.Fatalf("%s: a limit of %d MiB left the %d MiB cover's image in the pool", when, size>>20, c>>20)
			}
			checkPooledLimit(ctx, t, s, under, key, c, size)
		}
	}

	checkCovers("after a start with default_max_size")
	// The smallest limits each cover serves, or near them, then the
	// largest: none served by a limit asked for before.
	takeCovers("low", []int64{MinMaxSize, 129 << 20, 513 << 20, 3 << 30, 20 << 30, 33 << 30})
	s.pool.refill(ctx)
	checkCovers("after the refill")
	takeCovers("high", []int64{120 << 20, 500 << 20, 2 << 30, 7 << 30, 15 << 30, 128 << 30})
	s.pool.refill(ctx)
	s.pool.wait()

	// Asked for again: an image of the limit's class, its ballast as the
	// refill left it (the Prepare cut nothing).
	resume := holdRefills(&s.pool)
	for _, size := range []int64{7 << 30, 15 << 30, 128 << 30} {
		key := "again-" + strconv.FormatInt(size>>20, 10)
		c := sizeClass(size)
		if _, err := s.Prepare(ctx, key, "", withMaxSize(size)); err != nil {
			t.Fatal(err)
		}
		if n := s.pool.readyOf(c, size); n != poolSize-1 {
			t.Fatalf("a limit of %d MiB asked for again: %d left cut for it, want %d", size>>20, n, poolSize-1)
		}
		checkPooledLimit(ctx, t, s, under, key, c, size)
		if length, filled := ballastOf(t, s.snapshotDir(s.idOf(ctx, t, key))); filled != -1 {
			t.Fatalf("a limit of %d MiB asked for again: its Prepare cut the ballast from %d to %d bytes; want it taken as the refill cut it", size>>20, filled, length)
		}
	}
	resume()

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	ctx, s = openTest(t, root, withCovers())
	checkCovers("after a restart without default_max_size")
	resume = holdRefills(&s.pool)
	if _, err := s.Prepare(ctx, "after-restart", "", withMaxSize(60<<30)); err != nil {
		t.Fatal(err)
	}
	if n := s.pool.readyOf(128<<30, 32<<30); n != 0 {
		t.Fatal("after a restart, a limit of 60 GiB did not take the 128 GiB cover's image")
	}
	checkPooledLimit(ctx, t, s, under, "after-restart", 128<<30, 60<<30)
	resume()
}

// checkPooledLimit checks that key's image is one of class from the pool
// held to limit: the blocks outside its ballast, all that the image can
// take of the host's disk, are at most limit, and so is the image file;
// a limit up to 128 MiB is written past (ENOSPC).
func checkPooledLimit(ctx context.Context, t *testing.T, s *Snapshotter, under, key string, class, limit int64) {
	t.Helper()
	size, _ := imageFile(ctx, t, s, under, key)
	if size != class || !hasBallast(ctx, t, s, key) {
		t.Fatalf("%s: image of %d bytes, ballast %v; want a pooled one of %d", key, size, hasBallast(ctx, t, s, key), class)
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(s.snapshotDir(s.idOf(ctx, t, key)), ballastName), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != ballastFor(class, limit) || class-st.Blocks*512 > limit {
		t.Fatalf("%s: ballast of %d bytes, %d allocated, in a %d-byte image; want %d, leaving at most %d outside", key, st.Size, st.Blocks*512, class, ballastFor(class, limit), limit)
	}
	if limit <= 128<<20 {
		if err := fillUp(filepath.Join(bindSource(ctx, t, s, key), "big"), 2*limit); !isFull(err) {
			t.Fatalf("%s: writing past %d bytes: %v, want ENOSPC", key, limit, err)
		}
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
