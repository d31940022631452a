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

// ready is how many images of class the pool holds, -1 if it pools none.
func (p *imagePool) readyOf(class int64) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, ps := range p.sizes {
		if ps.size == class {
			return len(ps.ready)
		}
	}
	return -1
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

// writeExactly writes n bytes to a new file at path and syncs it.
func writeExactly(path string, n int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := f.Write(buf[:k]); err != nil {
			return err
		}
		n -= k
	}
	return f.Sync()
}

// TestBallastServesSizes: once a class is pooled, limits never asked for
// from a quarter of it up to all of it take its images (a ballast in
// each), and each limit holds exactly: right after the Prepare a container
// writes the limit less the class image's metadata (the room the ballast's
// cut freed, which ext4 hands out only after a journal commit it forces),
// and a write past gets ENOSPC; the image file never holds more than the
// limit of the host's disk; Usage agrees with a walk.
func TestBallastServesSizes(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
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
			if err := writeExactly(filepath.Join(rootfs, "room"), room); err != nil {
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

// TestBallastColdThenPooled: a limit with no pooled class from itself to
// four times itself is made in its Prepare, at exactly its size and with
// no ballast, and its class joins the pool: the next limits it serves,
// the same or another, take its images.
func TestBallastColdThenPooled(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	// default_max_size's class (64 MiB) is pooled from the start: it
	// serves 32-64 MiB, not 150 MiB.
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(testLimit))
	under := underMounts(t, root)
	s.pool.wait()
	const cold = 150 << 20
	if _, err := s.Prepare(ctx, "cold", "", withMaxSize(cold)); err != nil {
		t.Fatal(err)
	}
	if size, _ := imageFile(ctx, t, s, under, "cold"); size != cold || hasBallast(ctx, t, s, "cold") {
		t.Fatalf("the first of a limit no pooled class serves: image of %d bytes, ballast %v; want %d and none", size, hasBallast(ctx, t, s, "cold"), cold)
	}
	if err := fillUp(filepath.Join(bindSource(ctx, t, s, "cold"), "big"), 2*cold); !isFull(err) {
		t.Fatalf("a cold image's limit: %v", err)
	}
	s.pool.wait()
	if n := s.pool.readyOf(sizeClass(cold)); n != poolSize {
		t.Fatalf("after a cold Prepare, its class has %d ready; want %d", n, poolSize)
	}
	for _, limit := range []int64{cold, 70 << 20} { // the same, and one never asked for
		key := "warm" + strconv.FormatInt(limit>>20, 10)
		if _, err := s.Prepare(ctx, key, "", withMaxSize(limit)); err != nil {
			t.Fatal(err)
		}
		if size, _ := imageFile(ctx, t, s, under, key); size != sizeClass(cold) || !hasBallast(ctx, t, s, key) {
			t.Fatalf("a limit of %d after the class was pooled: image of %d bytes, ballast %v; want the class's", limit, size, hasBallast(ctx, t, s, key))
		}
		s.pool.wait()
	}
	if n := s.pool.readyOf(128 << 20); n != -1 {
		t.Fatalf("a limit served by a pooled class pooled its own class too (%d ready)", n)
	}
}

// TestBallastDefault: default_max_size's images come with their ballast
// cut for it already (a Prepare with the default cuts nothing); they serve
// a label from the default up to their class, cut further, and not one
// below the default, whose first Prepare is cold and pools its class
// apart; each limit holds.
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
	if _, err := s.Prepare(ctx, "seed", "", withMaxSize(sizeClass(testLimit))); err != nil {
		t.Fatal(err)
	}
	s.pool.wait()
	for _, key := range []string{"limited", "lost"} {
		if _, err := s.Prepare(ctx, key, "", withMaxSize(testLimit)); err != nil {
			t.Fatal(err)
		}
		if !hasBallast(ctx, t, s, key) {
			t.Fatal("a Prepare its class serves did not take a pooled image")
		}
	}
	if err := os.WriteFile(filepath.Join(bindSource(ctx, t, s, "limited"), "kept"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	syscall.Sync()
	before := map[string]snapshots.Usage{}
	for _, key := range []string{"limited", "lost"} {
		u, err := s.Usage(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		before[key] = u
	}
	// Not the limit: it stays what the Prepare made.
	if _, err := s.Update(ctx, snapshots.Info{Name: "limited", Labels: map[string]string{LabelMaxSize: strconv.Itoa(2 * testLimit)}}, "labels."+LabelMaxSize); err != nil {
		t.Fatal(err)
	}
	dirs := map[string]string{}
	for _, key := range []string{"limited", "lost"} {
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

// TestPoolPicksClass: a limit takes the smallest pooled class from itself
// to four times itself that has an image ready (the default's class only
// from the default up); with none ready, the smallest pooled class serving
// it, or else its own class, becomes the most recently asked for, and a
// new class pushes out the least recently asked for but the default's.
// (No images: the choice alone.)
func TestPoolPicksClass(t *testing.T) {
	const mib, gib = 1 << 20, 1 << 30
	one := func() []pooledImage { return []pooledImage{{img: &loopImage{mnt: -1}}} }
	p := &imagePool{sizes: []*pooledSize{
		{size: gib, cutFor: 600 * mib, pinned: true, ready: one()}, {size: 256 * mib, ready: one()}, {size: 512 * mib},
	}}
	order := func() []int64 {
		var o []int64
		for _, ps := range p.sizes {
			o = append(o, ps.size)
		}
		return o
	}
	for _, c := range []struct {
		size, class int64
		got         bool
	}{
		{200 * mib, 256 * mib, true},  // the smallest that serves it
		{200 * mib, 256 * mib, false}, // none ready: its smallest
		{300 * mib, 512 * mib, false}, // 1 GiB's are cut for 600 MiB: 512 MiB's
		{700 * mib, gib, true},        // past 600 MiB, the default's serve
		{5 * gib, 8 * gib, false},     // nothing serves it: its own class
		{20 * gib, 32 * gib, false},   // pushes out the least recent: 512 MiB
		{80 * gib, 128 * gib, false},  // then 256 MiB
		{300 * gib, 512 * gib, false}, // then 8 GiB: never the default's
	} {
		got, class := p.pop(c.size)
		if class != c.class || (got.img != nil) != c.got {
			t.Fatalf("pop(%d MiB): class %d MiB, image %v; want %d MiB, %v", c.size/mib, class/mib, got.img != nil, c.class/mib, c.got)
		}
	}
	want := []int64{512 * gib, 128 * gib, 32 * gib, gib}
	if o := order(); !slices.Equal(o, want) {
		t.Fatalf("pooled classes %v, want %v", o, want)
	}
}
