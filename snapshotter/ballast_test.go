package snapshotter

import (
	"cmp"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	cfs "github.com/containerd/continuity/fs"
	"golang.org/x/sys/unix"
)

// testClass is the class the ballast tests pool: small, so that filling
// its images is quick, and serving limits from 32 MiB (MinMaxSize) up.
const testClass = 128 << 20

func TestSizeClass(t *testing.T) {
	for _, c := range []struct{ size, class int64 }{
		{MinMaxSize, MinMaxSize},
		{MinMaxSize + 1, 2 * MinMaxSize},
		{100 << 20, 128 << 20},
		{1 << 30, 1 << 30},
		{1<<30 + 1, 2 << 30},
		{10 << 30, 16 << 30},
	} {
		if got := sizeClass(c.size); got != c.class {
			t.Errorf("sizeClass(%d) = %d, want %d", c.size, got, c.class)
		}
		if !serves(c.class, c.size) {
			t.Errorf("class %d does not serve its own size %d", c.class, c.size)
		}
	}
	if serves(testClass, testClass+1) || serves(4*testClass+1, testClass) || !serves(4*testClass, testClass) {
		t.Error("serves: want a class to hold limits from a quarter of it up to all of it")
	}
}

// underMounts shows root's snapshots dir as it is below the images mounted
// on its entries (a bind mount without its submounts), so that a test can
// look at the image files themselves.
func underMounts(t *testing.T, root string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount(filepath.Join(root, snapshotsDir), dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s: %v", root, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// imageFile is the size and the allocated bytes of key's image file.
func imageFile(ctx context.Context, t *testing.T, s *Snapshotter, under, key string) (size, allocated int64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(under, s.idOf(ctx, t, key), imageName), &st); err != nil {
		t.Fatal(err)
	}
	return st.Size, st.Blocks * 512
}

// hasBallast tells whether key's image came from the pool: it has a ballast.
func hasBallast(ctx context.Context, t *testing.T, s *Snapshotter, key string) bool {
	t.Helper()
	_, err := os.Lstat(filepath.Join(s.snapshotDir(s.idOf(ctx, t, key)), ballastName))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

// readyOf is how many images of class cut for a limit of cutFor the pool
// holds ready, -1 if it pools none.
func (p *imagePool) readyOf(class, cutFor int64) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, ps := range slices.Concat(p.sizes, p.covers) {
		if ps.size == class && ps.cutFor == cutFor {
			return len(ps.ready)
		}
	}
	return -1
}

// holdRefills waits for the pool's refill and keeps another from starting
// until the returned func is called, so that what a Prepare takes shows in
// readyOf.
func holdRefills(p *imagePool) (resume func()) {
	p.wait()
	p.mu.Lock()
	p.filling = true
	p.mu.Unlock()
	return func() {
		p.mu.Lock()
		p.filling = false
		p.mu.Unlock()
	}
}

// classMetadata is what ext4's own metadata takes of a fresh image of
// class: its size less what a file could be given in it.
func classMetadata(ctx context.Context, t *testing.T, s *Snapshotter, class int64) int64 {
	t.Helper()
	img, err := makeImage(ctx, &s.templates, filepath.Join(t.TempDir(), "image"), class)
	if err != nil {
		t.Fatal(err)
	}
	defer img.close()
	var st unix.Statfs_t
	if err := unix.Fstatfs(img.mnt, &st); err != nil {
		t.Fatal(err)
	}
	return class - int64(st.Bavail)*st.Bsize
}

// TestBallastServesSizes: once limits are in use, limits never asked for
// from a quarter of a cover class up to all of it take its image (a
// ballast in each), and each limit holds exactly: right after the Prepare a container
// writes the limit less the class image's metadata (the room the ballast's
// cut freed, which ext4 hands out only after a journal commit it forces),
// and a write past gets ENOSPC; the image file never holds more than the
// limit of the host's disk; Usage agrees with a walk.
func TestBallastServesSizes(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay), withCovers(testClass))
	under := underMounts(t, root)
	committedBase(ctx, t, s)
	if _, err := s.Prepare(ctx, "seed", "base", withMaxSize(testClass)); err != nil {
		t.Fatal(err)
	}
	s.pool.wait()
	meta := classMetadata(ctx, t, s, testClass)
	t.Logf("a %d MiB image's metadata: %d KiB", testClass>>20, meta>>10)
	for _, limit := range []int64{MinMaxSize, 40 << 20, 100 << 20, testClass} {
		t.Run(strconv.FormatInt(limit>>20, 10)+"MiB", func(t *testing.T) {
			key := "c" + strconv.FormatInt(limit, 10)
			m, err := s.Prepare(ctx, key, "base", withMaxSize(limit))
			if err != nil {
				t.Fatal(err)
			}
			// A pooled image is the class's size and has a ballast; one
			// made in the call would be the limit's, with none.
			if size, _ := imageFile(ctx, t, s, under, key); size != testClass || !hasBallast(ctx, t, s, key) {
				t.Fatalf("a limit of %d: image of %d bytes, ballast %v; want a pooled one of %d", limit, size, hasBallast(ctx, t, s, key), testClass)
			}
			rootfs := mountAt(t, m)
			// The file's extent tree and the dir's block: a few blocks.
			const slack = 256 << 10
			room := limit - meta - slack
			if err := fillUp(filepath.Join(rootfs, "room"), room); err != nil {
				t.Fatalf("right after Prepare, writing %d bytes (the limit %d less the image's metadata %d and %d): %v", room, limit, meta, slack, err)
			}
			if err := fillUp(filepath.Join(rootfs, "past"), 2*slack+(4<<20)); !isFull(err) {
				t.Fatalf("writing past %d of a %d limit: %v, want ENOSPC", room, limit, err)
			}
			if _, allocated := imageFile(ctx, t, s, under, key); allocated > limit {
				t.Fatalf("the full image file holds %d bytes of the host's disk, past its limit %d", allocated, limit)
			}
			checkUsageWalk(ctx, t, s, key)
			if err := mount.UnmountAll(rootfs, 0); err != nil {
				t.Fatal(err)
			}
			s.pool.wait()
		})
	}
}

// checkUsageWalk checks key's Usage against a walk of its upper: inodes
// exactly, bytes within a block per inode.
func checkUsageWalk(ctx context.Context, t *testing.T, s *Snapshotter, key string) {
	t.Helper()
	syscall.Sync()
	u, err := s.Usage(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	walk, err := cfs.DiskUsage(ctx, s.upperPath(s.idOf(ctx, t, key)))
	if err != nil {
		t.Fatal(err)
	}
	if u.Inodes != walk.Inodes {
		t.Errorf("Usage says %d inodes, a walk %d", u.Inodes, walk.Inodes)
	}
	if d := u.Size - walk.Size; d < -4096*walk.Inodes || d > 4096*walk.Inodes {
		t.Errorf("Usage says %d bytes, a walk %d: off by more than a block per inode", u.Size, walk.Size)
	}
}

// TestBallastUsageMatchesWalk is TestLimitUsageMatchesWalk on an image
// from the pool, whose ballast Usage leaves out.
func TestBallastUsageMatchesWalk(t *testing.T) {
	needLimits(t)
	usageMatchesWalk(t, limitRoot(t), true)
}

// TestBallastColdThenPooled: without covers (limits past the largest, or
// before the refill caught up), a limit no pooled image serves is made in
// its Prepare, at exactly its size and with no ballast, and it joins the
// pool: its class's images cut for it, so that the same limit again takes
// one and cuts nothing, and a larger limit of the class takes one and cuts
// it further; a smaller one does not (it would hold more than its limit).
func TestBallastColdThenPooled(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	// default_max_size (48 MiB) is pooled from the start: its class, 64
	// MiB, serves 48-64 MiB, not 150 MiB.
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(testLimit))
	under := underMounts(t, root)
	s.pool.wait()
	const cold, class = 150 << 20, 256 << 20
	if _, err := s.Prepare(ctx, "cold", "", withMaxSize(cold)); err != nil {
		t.Fatal(err)
	}
	if size, _ := imageFile(ctx, t, s, under, "cold"); size != cold || hasBallast(ctx, t, s, "cold") {
		t.Fatalf("the first of a limit no pooled image serves: image of %d bytes, ballast %v; want %d and none", size, hasBallast(ctx, t, s, "cold"), cold)
	}
	if err := fillUp(filepath.Join(bindSource(ctx, t, s, "cold"), "big"), 2*cold); !isFull(err) {
		t.Fatalf("a cold image's limit: %v", err)
	}
	s.pool.wait()
	if n := s.pool.readyOf(class, cold); n != poolSize {
		t.Fatalf("after a cold Prepare, %d of its class cut for it ready; want %d", n, poolSize)
	}
	for _, c := range []struct {
		key    string
		limit  int64
		pooled bool
		cut    bool
	}{
		{"again", cold, true, false},
		{"larger", 200 << 20, true, true},
		{"smaller", 100 << 20, false, false},
	} {
		resume := holdRefills(&s.pool)
		if _, err := s.Prepare(ctx, c.key, "", withMaxSize(c.limit)); err != nil {
			t.Fatal(err)
		}
		size, _ := imageFile(ctx, t, s, under, c.key)
		if pooled := size == class && hasBallast(ctx, t, s, c.key); pooled != c.pooled {
			t.Fatalf("%s (%d): image of %d bytes, ballast %v; want from the pool: %v", c.key, c.limit, size, hasBallast(ctx, t, s, c.key), c.pooled)
		}
		if c.pooled {
			if n := s.pool.readyOf(class, cold); n != poolSize-1 {
				t.Fatalf("%s: %d left cut for %d; want %d", c.key, n, cold, poolSize-1)
			}
			// Cut: as long as the limit wants, and as filled on it; not
			// cut: marked taken.
			if length, filled := ballastOf(t, s.snapshotDir(s.idOf(ctx, t, c.key))); length != ballastFor(class, c.limit) || (filled != -1) != c.cut {
				t.Fatalf("%s: ballast %d bytes, %d as filled; want %d, cut by the Prepare: %v", c.key, length, filled, ballastFor(class, c.limit), c.cut)
			}
		}
		if err := fillUp(filepath.Join(bindSource(ctx, t, s, c.key), "big"), 2*c.limit); !isFull(err) {
			t.Fatalf("%s: the limit: %v", c.key, err)
		}
		if _, allocated := imageFile(ctx, t, s, under, c.key); allocated > c.limit {
			t.Fatalf("%s: the image file holds %d bytes, past its limit %d", c.key, allocated, c.limit)
		}
		resume()
		s.pool.refill(ctx)
		s.pool.wait()
	}
}

// ballastOf is the length of the ballast at the root of the image mounted
// on dir, and the length the pool filled it to (-1: taken as it was).
func ballastOf(t *testing.T, dir string) (length, filled int64) {
	t.Helper()
	fd, err := unix.Open(filepath.Join(dir, ballastName), unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 32)
	n, err := unix.Fgetxattr(fd, ballastXattr, buf)
	if err != nil {
		t.Fatal(err)
	}
	filled, err = strconv.ParseInt(string(buf[:n]), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size, filled
}

// TestBallastDefault: default_max_size's images come with their ballast
// cut for it already (a Prepare with the default cuts nothing); they serve
// a label from the default up to their class, cut further, and not one
// below the default, whose first Prepare (no covers here) is cold and
// pools its class cut for it apart; each limit holds.
func TestBallastDefault(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(testLimit))
	under := underMounts(t, root)
	s.pool.wait()
	class := sizeClass(testLimit)
	s.pool.mu.Lock()
	for _, ps := range s.pool.sizes {
		for _, r := range ps.ready {
			var st unix.Stat_t
			if err := unix.Fstatat(r.img.mnt, ballastName, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Size != ballastFor(class, testLimit) {
				t.Errorf("a pooled image of the default's class: ballast %d bytes, %v; want cut for the default, %d", st.Size, err, ballastFor(class, testLimit))
			}
		}
	}
	s.pool.mu.Unlock()
	for _, c := range []struct {
		key    string
		limit  int64 // 0: the default
		pooled bool
	}{
		{"default", 0, true},
		{"above", 56 << 20, true},
		{"below", 40 << 20, false},
		{"below-again", 40 << 20, true},
	} {
		var opts []snapshots.Opt
		if c.limit != 0 {
			opts = append(opts, withMaxSize(c.limit))
		}
		if _, err := s.Prepare(ctx, c.key, "", opts...); err != nil {
			t.Fatal(err)
		}
		limit := cmp.Or(c.limit, testLimit)
		size, _ := imageFile(ctx, t, s, under, c.key)
		if pooled := size == class && hasBallast(ctx, t, s, c.key); pooled != c.pooled {
			t.Fatalf("%s (limit %d): image of %d bytes, ballast %v; want from the pool: %v", c.key, limit, size, hasBallast(ctx, t, s, c.key), c.pooled)
		}
		upper := bindSource(ctx, t, s, c.key)
		if err := fillUp(filepath.Join(upper, "big"), 2*limit); !isFull(err) {
			t.Fatalf("%s: the limit: %v", c.key, err)
		}
		fi, err := os.Stat(filepath.Join(upper, "big"))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() < limit*8/10 || fi.Size() > limit {
			t.Fatalf("%s: full at %d bytes of a %d limit; want 80%%-100%%", c.key, fi.Size(), limit)
		}
		if _, allocated := imageFile(ctx, t, s, under, c.key); allocated > limit {
			t.Fatalf("%s: the image file holds %d bytes, past its limit %d", c.key, allocated, limit)
		}
		s.pool.wait()
	}
}

// TestBallastRestart: an image from the pool keeps its limit and its
// Usage across a daemon restart and a reboot, also when its label was
// changed since (Update changes no limit); and a reboot after a power cut
// that lost the ballast's cut (the image's journal had not committed it:
// the ballast as long as the pool filled it) gets the cut made again at
// start: the container has its room, and no more.
func TestBallastRestart(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	under := underMounts(t, root)
	// Pools images of testLimit's class cut for 40 MiB, which the
	// Prepares of testLimit cut further.
	if _, err := s.Prepare(ctx, "seed", "", withMaxSize(40<<20)); err != nil {
		t.Fatal(err)
	}
	s.pool.wait()
	for _, key := range []string{"lost", "limited"} {
		if _, err := s.Prepare(ctx, key, "", withMaxSize(testLimit)); err != nil {
			t.Fatal(err)
		}
		if !hasBallast(ctx, t, s, key) {
			t.Fatal("a Prepare its class serves did not take a pooled image")
		}
	}
	// And one whose ballast the refill cut for testLimit already: the
	// Prepare cuts nothing.
	s.pool.wait()
	if _, err := s.Prepare(ctx, "exact", "", withMaxSize(testLimit)); err != nil {
		t.Fatal(err)
	}
	if _, filled := ballastOf(t, s.snapshotDir(s.idOf(ctx, t, "exact"))); filled != -1 {
		t.Fatalf("a limit asked for again: ballast filled to %d, want taken as the refill cut it", filled)
	}
	if err := os.WriteFile(filepath.Join(bindSource(ctx, t, s, "limited"), "kept"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	syscall.Sync()
	before := map[string]snapshots.Usage{}
	for _, key := range []string{"limited", "lost", "exact"} {
		u, err := s.Usage(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		before[key] = u
	}
	// Not the limit: it stays what the Prepare made.
	for _, key := range []string{"limited", "exact"} {
		if _, err := s.Update(ctx, snapshots.Info{Name: key, Labels: map[string]string{LabelMaxSize: strconv.Itoa(2 * testLimit)}}, "labels."+LabelMaxSize); err != nil {
			t.Fatal(err)
		}
	}
	dirs := map[string]string{}
	for _, key := range []string{"limited", "lost", "exact"} {
		dirs[key] = s.snapshotDir(s.idOf(ctx, t, key))
	}
	check := func(when string) {
		t.Helper()
		ctx, s = openTest(t, root)
		for key, u := range before {
			if got, err := s.Usage(ctx, key); err != nil || got != u {
				t.Fatalf("%s: %s's Usage %+v, %v; before it was %+v", when, key, got, err, u)
			}
			upper := bindSource(ctx, t, s, key)
			if err := fillUp(filepath.Join(upper, "big"), 2*testLimit); !isFull(err) {
				t.Fatalf("%s: %s's limit: %v", when, key, err)
			}
			fi, err := os.Stat(filepath.Join(upper, "big"))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size() < testLimit*8/10 || fi.Size() > testLimit {
				t.Fatalf("%s: %s full at %d bytes of a %d limit; want 80%%-100%%", when, key, fi.Size(), testLimit)
			}
			if _, allocated := imageFile(ctx, t, s, under, key); allocated > testLimit {
				t.Fatalf("%s: %s's image file holds %d bytes, past its limit %d", when, key, allocated, testLimit)
			}
			if err := os.Remove(filepath.Join(upper, "big")); err != nil {
				t.Fatal(err)
			}
		}
		syscall.Sync()
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	check("after a restart")
	for _, dir := range dirs {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Fatal(err)
		}
	}
	// The power cut: "lost"'s ballast as the pool filled it.
	mnt, err := mountImage(filepath.Join(under, filepath.Base(dirs["lost"]), imageName))
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Openat(mnt, ballastName, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 32)
	n, err := unix.Fgetxattr(fd, ballastXattr, buf)
	if err != nil {
		t.Fatal(err)
	}
	filled, _ := strconv.ParseInt(string(buf[:n]), 10, 64)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(fd, 0, st.Size, filled-st.Size); err != nil {
		t.Fatalf("ballast back to %d bytes: %v", filled, err)
	}
	unix.Fsync(fd)
	unix.Close(fd)
	unix.Close(mnt)
	check("after a reboot that lost a ballast's cut")
}

// TestPoolPicksClass: a limit takes, of the pooled images that serve it
// (their class from it to four times it, cut for at most it), one of the
// smallest class, and of those the one cut closest to it: cut for it
// itself, then for the largest limit below it; never one cut for a larger
// limit. Either way
// its own entry becomes the most recently asked for, pushing out the least
// recently asked for but the default's, and covers are never pushed out.
// (No images: the choice alone.)
func TestPoolPicksClass(t *testing.T) {
	const mib, gib = 1 << 20, 1 << 30
	one := func() []pooledImage { return []pooledImage{{img: &loopImage{mnt: -1}}} }
	p := &imagePool{
		sizes: []*pooledSize{
			{size: gib, cutFor: 600 * mib, keep: poolSize, pinned: true, ready: one()},
			{size: 256 * mib, cutFor: 200 * mib, keep: poolSize, ready: one()},
			{size: 128 * mib, cutFor: 128 * mib, keep: poolSize, ready: one()},
		},
		covers: []*pooledSize{
			{size: 128 * mib, cutFor: 32 * mib, keep: 1, ready: one()},
			{size: 512 * mib, cutFor: 128 * mib, keep: 1, ready: one()},
			{size: 2 * gib, cutFor: 512 * mib, keep: 1, ready: one()},
		},
	}
	for _, c := range []struct {
		size, class int64 // class 0: none
	}{
		{200 * mib, 256 * mib}, // cut for it
		{128 * mib, 128 * mib}, // cut for it; not 128 MiB's cover, nor 512 MiB's
		{512 * mib, 512 * mib}, // 512 MiB's cover, not 2 GiB's cut for it
		{200 * mib, 0},         // 256 MiB's is gone, 512 MiB's cover too
		{100 * mib, 128 * mib}, // 128 MiB's cover
		{700 * mib, gib},       // the default's, cut for 600 MiB, not the 2 GiB cover
		{550 * mib, 2 * gib},   // not the default's: cut for more than 550 MiB
		{5 * gib, 0},           // nothing serves it
	} {
		got, class := p.pop(c.size)
		if class != c.class || (got.img != nil) != (c.class != 0) {
			t.Fatalf("pop(%d MiB): from class %d MiB, image %v; want %d MiB", c.size/mib, class/mib, got.img != nil, c.class/mib)
		}
	}
	var asked []int64
	for _, ps := range p.sizes {
		asked = append(asked, ps.cutFor/mib)
	}
	if want := []int64{5 * 1024, 550, 700, 600}; !slices.Equal(asked, want) {
		t.Fatalf("limits asked for %v MiB, want %v", asked, want)
	}
	if len(p.covers) != 3 {
		t.Fatalf("%d covers left, want 3", len(p.covers))
	}
}

// TestJournalSize: images up to 16 GiB get the smallest journal; larger
// ones one big enough that the cut of the whole image, a bitmap block per
// 128 MiB group and a descriptor block per 64 groups, fits a transaction
// (a quarter of the journal).
func TestJournalSize(t *testing.T) {
	const mib, gib = 1 << 20, 1 << 30
	for _, c := range []struct{ size, journal int64 }{
		{MinMaxSize, 4 * mib}, {gib, 4 * mib}, {16 * gib, 4 * mib}, {32 * gib, 8 * mib}, {100*gib + 1, 25 * mib}, {100*gib + 8*mib, 26 * mib}, {128 * gib, 32 * mib},
	} {
		if got := journalSize(c.size); got != c.journal {
			t.Errorf("journalSize(%d) = %d, want %d", c.size, got, c.journal)
		}
		groups := c.size / (128 * mib)
		if txn := journalSize(c.size) / 4 / 4096; txn < groups+groups/64 {
			t.Errorf("journalSize(%d): a transaction of %d blocks does not fit the cut of %d groups", c.size, txn, groups)
		}
	}
}
