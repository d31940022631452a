package snapshotter

import (
	"cmp"
	"context"
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

// testClass is the class the reserve tests pool: small, so that filling
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

// fromPool tells whether key's image came from the pool: it has a limit
// recorded.
func fromPool(ctx context.Context, t *testing.T, s *Snapshotter, key string) bool {
	t.Helper()
	return limitRecord(t, s.snapshotDir(s.idOf(ctx, t, key))) != 0
}

// limitRecord is the limit recorded on the image mounted on dir.
func limitRecord(t *testing.T, dir string) int64 {
	t.Helper()
	return ofImage(t, dir, recordedLimit)
}

// reserveAt is the reserve, in clusters, of the image mounted on dir.
func reserveAt(t *testing.T, dir string) int64 {
	t.Helper()
	return ofImage(t, dir, reserveOf)
}

// ofImage is what get says of the image mounted on dir.
func ofImage(t *testing.T, dir string, get func(mnt int) (int64, error)) int64 {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	n, err := get(fd)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// readyOf is how many images of class the pool holds ready, -1 if it
// pools none.
func (p *imagePool) readyOf(class int64) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := -1
	for _, ps := range slices.Concat(p.sizes, p.covers) {
		if ps.size == class {
			n = max(n, 0) + len(ps.ready)
		}
	}
	return n
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
// class: its size less what a file could be given in it and the default
// reserve.
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
	return class - int64(st.Bfree)*st.Bsize
}

// TestReserveServesSizes: once limits are in use, limits never asked for
// from a quarter of a cover class up to all of it take its image, and each
// limit holds exactly: right after the Prepare a container writes the
// limit less the class image's metadata and ext4's default reserve, and a
// write past gets ENOSPC; the image file never holds more than the limit
// of the host's disk; Usage agrees with a walk.
func TestReserveServesSizes(t *testing.T) {
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
			// A pooled image is the class's size, its limit recorded;
			// one made in the call would be the limit's, with none.
			checkPooledLimit(ctx, t, s, under, key, testClass, limit)
			rootfs := mountAt(t, m)
			// The file's extent tree and the dir's block, a few
			// blocks, and the last hundred or so, which ext4 did not
			// hand out here under a raised reserve (delalloc's
			// reservations of pages not yet written back count against
			// it).
			const slack = 512 << 10
			room := limit - meta - min(testClass/reserveBlock/50, 4096)*reserveBlock - slack
			if err := fillUp(filepath.Join(rootfs, "room"), room); err != nil {
				t.Fatalf("right after Prepare, writing %d bytes (the limit %d less the image's metadata %d, the default reserve and %d): %v", room, limit, meta, slack, err)
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

// TestReserveUsageMatchesWalk is TestLimitUsageMatchesWalk on an image
// from the pool.
func TestReserveUsageMatchesWalk(t *testing.T) {
	needLimits(t)
	usageMatchesWalk(t, limitRoot(t), true)
}

// openDefaultPooled opens a snapshotter with default_max_size testLimit on
// a new root, its pool filled, and returns it with the root and the view
// of the root's snapshots below their mounts (underMounts).
func openDefaultPooled(t *testing.T) (context.Context, *Snapshotter, string, string) {
	t.Helper()
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDefaultMaxSize(testLimit))
	under := underMounts(t, root)
	s.pool.wait()
	return ctx, s, root, under
}

// TestReserveColdThenPooled: without covers (limits past the largest, or
// before the refill caught up), a limit no pooled image serves is made in
// its Prepare, at exactly its size and with no limit recorded, and its
// class joins the pool, so that the same limit again, a larger one and a
// smaller one of the class each take one; a limit the class does not
// serve (below a quarter of it) does not.
func TestReserveColdThenPooled(t *testing.T) {
	// default_max_size (48 MiB) is pooled from the start: its class, 64
	// MiB, serves 16-64 MiB, not 150 MiB.
	ctx, s, _, under := openDefaultPooled(t)
	const cold, class = 150 << 20, 256 << 20
	if _, err := s.Prepare(ctx, "cold", "", withMaxSize(cold)); err != nil {
		t.Fatal(err)
	}
	if size, _ := imageFile(ctx, t, s, under, "cold"); size != cold || fromPool(ctx, t, s, "cold") {
		t.Fatalf("the first of a limit no pooled image serves: image of %d bytes, from the pool %v; want %d and not", size, fromPool(ctx, t, s, "cold"), cold)
	}
	if err := fillUp(filepath.Join(bindSource(ctx, t, s, "cold"), "big"), 2*cold); !isFull(err) {
		t.Fatalf("a cold image's limit: %v", err)
	}
	s.pool.wait()
	if n := s.pool.readyOf(class); n != poolSize {
		t.Fatalf("after a cold Prepare, %d of its class ready; want %d", n, poolSize)
	}
	for _, c := range []struct {
		key    string
		limit  int64
		pooled bool
	}{
		{"again", cold, true},
		{"larger", 200 << 20, true},
		{"smaller", 100 << 20, true},
		{"too-small", 60 << 20, false}, // the default's class, 64 MiB
	} {
		resume := holdRefills(&s.pool)
		if _, err := s.Prepare(ctx, c.key, "", withMaxSize(c.limit)); err != nil {
			t.Fatal(err)
		}
		if c.pooled {
			if n := s.pool.readyOf(class); n != poolSize-1 {
				t.Fatalf("%s: %d left of its class; want %d", c.key, n, poolSize-1)
			}
			checkPooledLimit(ctx, t, s, under, c.key, class, c.limit)
		} else if size, _ := imageFile(ctx, t, s, under, c.key); size == class {
			t.Fatalf("%s (%d): took an image of class %d, which serves no limit below %d", c.key, c.limit, class, class/classSpan)
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

// TestReserveDefault: default_max_size's class is pooled from the start;
// its images serve the default, a label above it up to the class, and one
// below it down to a quarter of the class; each limit holds.
func TestReserveDefault(t *testing.T) {
	ctx, s, _, under := openDefaultPooled(t)
	class := sizeClass(testLimit)
	for _, c := range []struct {
		key    string
		limit  int64 // 0: the default
		pooled bool
	}{
		{"default", 0, true},
		{"above", 56 << 20, true},
		{"below", 40 << 20, true},
		{"again", 0, true},
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
		if pooled := size == class && fromPool(ctx, t, s, c.key); pooled != c.pooled {
			t.Fatalf("%s (limit %d): image of %d bytes, from the pool %v; want from the pool: %v", c.key, limit, size, fromPool(ctx, t, s, c.key), c.pooled)
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

// TestReserveRestart: an image from the pool keeps its limit and its
// Usage across a daemon restart and a reboot (the next mount starts from
// ext4's default reserve: start-up sets it again from the limit recorded),
// also when its label was changed since (Update changes no limit); and a
// reboot after a power cut that lost the record (the image's journal had
// not committed it) holds the image to its label: the container has its
// room, and no more.
func TestReserveRestart(t *testing.T) {
	needLimits(t)
	root := limitRoot(t)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	under := underMounts(t, root)
	// Pools images of testLimit's class.
	if _, err := s.Prepare(ctx, "seed", "", withMaxSize(40<<20)); err != nil {
		t.Fatal(err)
	}
	s.pool.wait()
	class := sizeClass(testLimit)
	for _, key := range []string{"lost", "limited"} {
		if _, err := s.Prepare(ctx, key, "", withMaxSize(testLimit)); err != nil {
			t.Fatal(err)
		}
		checkPooledLimit(ctx, t, s, under, key, class, testLimit)
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
			if got := reserveAt(t, dirs[key]); got != reserveFor(class, testLimit) {
				t.Fatalf("%s: %s's reserve is %d clusters, want %d", when, key, got, reserveFor(class, testLimit))
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
	check("after a reboot")
	for _, dir := range dirs {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Fatal(err)
		}
	}
	// The power cut: "lost"'s record as the pool left it. (From the loop
	// device still bound to the image if another mount namespace, made
	// meanwhile by a test running beside this one, holds it: loopdev.go.)
	mnt, err := remountImage(ctx, filepath.Join(under, filepath.Base(dirs["lost"]), imageName))
	if err != nil {
		t.Fatal(err)
	}
	rootfd, err := unix.Openat(mnt, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fsetxattr(rootfd, limitXattr, []byte(formatLimit(0)), unix.XATTR_REPLACE); err != nil {
		t.Fatal(err)
	}
	unix.Fsync(rootfd)
	unix.Close(rootfd)
	unix.Close(mnt)
	check("after a reboot that lost a Prepare's record of its limit")
}

// TestPoolPicksClass: a limit takes, of the pooled images that serve it
// (their class from it to four times it), one of the smallest class. Either
// way its class becomes the most recently asked for, pushing out the least
// recently asked for but the default's, and covers are never pushed out.
// (No images: the choice alone.)
func TestPoolPicksClass(t *testing.T) {
	const mib, gib = 1 << 20, 1 << 30
	one := func() []pooledImage { return []pooledImage{{img: &loopImage{mnt: -1}}} }
	p := &imagePool{
		sizes: []*pooledSize{
			{size: gib, keep: poolSize, pinned: true, ready: one()},
			{size: 256 * mib, keep: poolSize, ready: one()},
		},
		covers: []*pooledSize{
			{size: 128 * mib, keep: 1, ready: one()},
			{size: 512 * mib, keep: 1, ready: one()},
			{size: 2 * gib, keep: 1, ready: one()},
		},
	}
	for _, c := range []struct {
		size, class int64 // class 0: none
	}{
		{200 * mib, 256 * mib}, // its own class
		{100 * mib, 128 * mib}, // 128 MiB's cover, not 256 MiB's
		{130 * mib, 512 * mib}, // 256 MiB's is gone, the next serving it
		{200 * mib, 0},         // 256 MiB's and 512 MiB's are gone; 1 GiB does not serve it
		{700 * mib, gib},       // the default's, not the 2 GiB cover
		{550 * mib, 2 * gib},   // the default's is gone
		{5 * gib, 0},           // nothing serves it
	} {
		got, class := p.pop(c.size)
		if class != c.class || (got.img != nil) != (c.class != 0) {
			t.Fatalf("pop(%d MiB): from class %d MiB, image %v; want %d MiB", c.size/mib, class/mib, got.img != nil, c.class/mib)
		}
	}
	var asked []int64
	for _, ps := range p.sizes {
		asked = append(asked, ps.size/mib)
	}
	if want := []int64{8 * 1024, 1024, 256, 128}; !slices.Equal(asked, want) {
		t.Fatalf("classes asked for %v MiB, want %v", asked, want)
	}
	if len(p.covers) != 3 {
		t.Fatalf("%d covers left, want 3", len(p.covers))
	}
}

// TestReserveLegacyBallast: an image held to its limit by a ballast file,
// the way pooled images were before the reserve, keeps working: its Usage
// leaves the ballast out, and after a reboot start-up sets no reserve on
// top of the ballast (which would leave the container no room).
func TestReserveLegacyBallast(t *testing.T) {
	ctx, s, root, under := openDefaultPooled(t)
	if _, err := s.Prepare(ctx, "old", ""); err != nil {
		t.Fatal(err)
	}
	dir := s.snapshotDir(s.idOf(ctx, t, "old"))
	class := sizeClass(testLimit)
	checkPooledLimit(ctx, t, s, under, "old", class, testLimit)
	// As the ballast's Prepare left it: a ballast of C-L, ext4's default
	// reserve, no limit recorded.
	fd, err := unix.Open(filepath.Join(dir, "ballast"), unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(fd, 0, 0, class-testLimit); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	root0, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = setRecord(root0, 0)
	unix.Close(root0)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fs", "kept"), []byte("kept"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Unmount(dir, 0); err != nil { // a reboot
		t.Fatal(err)
	}
	ctx, s = openTest(t, root)
	if got, want := reserveAt(t, dir), reserveFor(class, class); got != want {
		t.Fatalf("after a reboot, an image with a ballast has a reserve of %d clusters, want ext4's default %d", got, want)
	}
	checkUsageWalk(ctx, t, s, "old")
	if err := fillUp(filepath.Join(dir, "fs", "big"), 2*testLimit); !isFull(err) {
		t.Fatalf("the ballast's limit: %v", err)
	}
	fi, err := os.Stat(filepath.Join(dir, "fs", "big"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() < testLimit*7/10 || fi.Size() > testLimit {
		t.Fatalf("full at %d bytes of a %d limit held by a ballast; want 70%%-100%%", fi.Size(), testLimit)
	}
}
