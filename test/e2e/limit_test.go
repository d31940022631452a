package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	cfs "github.com/containerd/continuity/fs"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// e2eLimit is the limit the containers run with; e2eFill is past it.
const (
	e2eLimit = 40 << 20
	e2eFill  = 80 << 20
)

// criLimit is TestCRISizeLimit's default_max_size, and criFill past it:
// its container first copies up the image's 64 MiB file, which must fit
// in the limit with room to write.
const (
	criLimit = 96 << 20
	criFill  = 128 << 20
)

// TestContainerd2SizeLimit runs containers through containerd 2.4 with
// `ctr run --snapshotter-label containerd.io/snapshot/max-size=...`:
//
//   - on overclone (overlay mode) a write past the limit fails inside the
//     container with "no space left on device", and once the container
//     is removed its image is unmounted;
//   - a container without the label on the same overclone writes the
//     same amount;
//   - on a root on btrfs with qgroups enabled (the same daemon restarted
//     on it) the limited container's writable layer is a subvolume and
//     the write fails with "disk quota exceeded"; containerd's GC leaves
//     no subvolume and no qgroup;
//   - overclone in userspace mode refuses the label, and containerd's
//     error says why, rather than running the container unlimited.
func TestContainerd2SizeLimit(t *testing.T) {
	s := newSuite(t, harness.Containerd2BinDir(), harness.ContainerdOptions{})
	s.ctr(t, "images", "import", "--no-unpack", s.f.archive)
	label := "--snapshotter-label=" + snapshots.LabelSnapshotMaxSize + "=" + strconv.Itoa(e2eLimit)
	fill := []string{"/bin/viewer", "fill", "/past-the-limit", strconv.Itoa(e2eFill)}
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()

	sn := harness.SnapshotterName
	s.ctr(t, "images", "import", "--snapshotter", sn, s.f.archive)
	s.fillPastLimit(ctx, t, "limited", []string{label, "--snapshotter", sn}, e2eFill, "no space left on device")
	s.ctr(t, append([]string{"run", "--rm", "--snapshotter", sn, imageName, "unlimited"}, fill...)...)
	// containerd removes a container's snapshot from the snapshotter in
	// its garbage collection; images rm --sync runs one and waits.
	s.removeImages(t)
	if left := mountsUnder(t, s.oc.Root+"/snapshots/"); len(left) > 0 {
		t.Errorf("mounts left after containerd's GC: %v", left)
	}
	qgroupSizeLimit(ctx, t, s, label)

	us := harness.UserspaceName
	s.ctr(t, "images", "import", "--snapshotter", us, s.f.archive)
	out, err := s.c.Ctr(ctx, append([]string{"run", "--rm", label, "--snapshotter", us, imageName, "userspace"}, fill...)...)
	if err == nil || !strings.Contains(out+err.Error(), "userspace mode") {
		t.Fatalf("a limit in userspace mode: %v, output %q; want a refusal naming userspace mode", err, out)
	}
}

// mountsUnder lists the mount points under prefix.
func mountsUnder(t *testing.T, prefix string) []string {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], prefix) {
			out = append(out, f[4])
		}
	}
	return out
}

// limitRoot is a root overclone's size limits are tried on: a directory
// of the test's, where a limited snapshot is an ext4 image, or a fresh
// loop-mounted btrfs with quotas of one kind enabled, where it is a
// subvolume with a qgroup limit (README "On a btrfs root").
type limitRoot struct {
	name    string
	quota   loopfs.Quota // "" for the image
	backend snapshotter.LimitBackend
	full    string // what a write past the limit fails with
}

var (
	imageRoot  = limitRoot{"image", "", snapshotter.LimitImage, "no space left on device"}
	qgroupRoot = limitRoot{"btrfs-qgroup", loopfs.Qgroups, snapshotter.LimitQgroup, "disk quota exceeded"}
	squotaRoot = limitRoot{"btrfs-squota", loopfs.SimpleQuotas, snapshotter.LimitQgroup, "disk quota exceeded"}
)

// checkBackend checks that the daemon said at start, in its log, that
// it enforces limits with r's backend; on the image backend, that it could
// keep images ready and hold them to their limits (it sets their ext4
// reserves in /sys/fs/ext4, which a container sees only if privileged).
func (r limitRoot) checkBackend(t *testing.T, oc *harness.Overclone) {
	t.Helper()
	b, err := os.ReadFile(oc.Log)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "backend="+string(r.backend)) {
		t.Errorf("the daemon's log does not say backend=%s:\n%s", r.backend, oc.Tail(20))
	}
	for _, bad := range []string{"no image is kept ready", "failed to take a pooled image", "failed to make a pooled image"} {
		if strings.Contains(string(b), bad) {
			t.Errorf("the daemon's log says %q:\n%s", bad, oc.Tail(20))
		}
	}
}

// mount makes r's btrfs, quotas enabled as an operator would, and returns
// its mount point; "" for the image root. It is unmounted when t ends, so
// call it before registering the cleanup that stops a daemon on it.
func (r limitRoot) mount(t *testing.T) string {
	t.Helper()
	if r.quota == "" {
		return ""
	}
	mnt := loopfs.Mount(t, loopfs.Btrfs)
	loopfs.EnableQuotas(t, mnt, r.quota)
	return mnt
}

// limitedDirs lists the snapshot directories of root that carry a limit,
// whatever the backend: those an image is mounted on, and those that are
// btrfs subvolumes.
func limitedDirs(t *testing.T, root string) []string {
	t.Helper()
	dirs := mountsUnder(t, root+"/snapshots/")
	entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		p := filepath.Join(root, "snapshots", e.Name())
		var st unix.Stat_t
		var sfs unix.Statfs_t
		if unix.Lstat(p, &st) == nil && st.Ino == 256 && st.Mode&unix.S_IFMT == unix.S_IFDIR &&
			unix.Statfs(p, &sfs) == nil && sfs.Type == unix.BTRFS_SUPER_MAGIC && !slices.Contains(dirs, p) {
			dirs = append(dirs, p)
		}
	}
	return dirs
}

// TestCRISizeLimit runs a pod through containerd 2.x's CRI plugin, as a
// kubelet does, on the shipped config-v3 snippet with overclone started
// with default_max_size (CRI cannot pass the max-size label yet, so the
// default is what limits a pod's containers), on each limitRoot: the
// image, and btrfs with qgroups and with simple quotas. The container
// copies up the image's 64 MiB file (a rename) and writes under the limit,
// both of which succeed, then past it, which fails inside the container
// (ENOSPC, EDQUOT); the daemon's log names the backend; crictl stats
// reports the writable layer as a walk of its upper finds it (inodes
// exact, bytes within a block per inode: from the image's counters, or
// the qgroup's and a count in the subvolume's tree; under simple quotas
// less the copy-up's reflinked extents); once the pod and the image are
// removed and containerd collected them, no image is mounted and no
// subvolume or qgroup is left. The pod carries the annotation
// containerd.io/snapshot/max-size "0", which CRI passes to its sandbox's
// snapshot alone (README "Size limits and Usage"): the pause container
// gets no limit, the pod's container still does.
func TestCRISizeLimit(t *testing.T) {
	for _, r := range []limitRoot{imageRoot, qgroupRoot, squotaRoot} {
		t.Run(r.name, func(t *testing.T) { criSizeLimit(t, r) })
	}
}

func criSizeLimit(t *testing.T, r limitRoot) {
	f, crictlDir, pause := criSetup(t)
	binDir := harness.Containerd2BinDir()
	if m := harness.Missing(binDir, harness.ContainerdTools...); m != "" {
		require.Skipf(t, "containerd 2.x missing: %s (make containerd2)", m)
	}
	mnt := r.mount(t)
	snippet, dir, cri := criDirs(t, f, "config-v3.toml", "oc-cri-limit-")
	n := &criNode{sn: harness.SnapshotterName, cli: f.cliBin, img: f.img, tm: &harness.Timings{}, dir: filepath.Join(dir, "ctd"),
		podAnnotations: map[string]string{snapshots.LabelSnapshotMaxSize: "0"}}
	t.Cleanup(func() {
		n.close(t)
		stopOverclone(t, n.oc)
		if err := harness.UnmountUnder(dir); err != nil {
			t.Error(err)
		}
		_ = os.RemoveAll(dir)
		removeCRICgroup(criCgroup)
	})
	for _, sub := range []string{"oc", "ctd"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var err error
	if n.oc, err = harness.NewOverclone(f.overcloneBin, filepath.Join(dir, "oc"), "default_max_size = "+strconv.Itoa(criLimit)+"\n", t.Logf); err != nil {
		t.Fatal(err)
	}
	if mnt != "" {
		n.oc.Root = filepath.Join(mnt, "root")
	}
	if err := n.oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	opts := harness.ContainerdOptions{BinDir: binDir, CRI: cri, Snippet: string(snippet),
		Proxies: []harness.Proxy{{Name: n.sn, Overclone: n.oc}}}
	if n.c, err = harness.StartContainerd(ctx, n.dir, opts, t.Logf); err != nil {
		t.Fatal(err)
	}
	if n.crictl, err = harness.NewCrictl(crictlDir, n.dir, n.c); err != nil {
		t.Fatal(err)
	}
	n.waitCRI(t)
	n.ctrCRI(t, "images", "import", "--snapshotter", n.sn, pause)
	ref := f.registry.Host + "/overclone/cri-limit:1"
	n.push(t, f.archive, ref)

	n.run(t, "pull", ref)
	podCfg, ctrCfg := n.writeConfigs(t, "limited", ref)
	pod := n.run(t, "runp", podCfg)
	if l := limitedDirs(t, n.oc.Root); len(l) != 0 {
		t.Errorf("the sandbox, annotated %s=0, got a limit: %v", snapshots.LabelSnapshotMaxSize, l)
	}
	id := n.run(t, "create", pod, ctrCfg, podCfg)
	limited := limitedDirs(t, n.oc.Root)
	if len(limited) != 1 {
		t.Fatalf("with the pod's container created, limited snapshots %v; want the container's alone", limited)
	}
	if m := mountsUnder(t, n.oc.Root+"/"); mnt != "" && len(m) > 0 {
		t.Errorf("mounts under a root on btrfs with quotas, where a limit needs none (no image, no pool): %v", m)
	}
	r.checkBackend(t, n.oc)
	n.run(t, "start", id)
	// A copy-up of a lower file (a rename copies a file up), a write
	// under the limit, then one past it.
	n.exec(t, id, "rename", "/"+image.BigFile, "/"+image.BigFile+"-moved")
	n.exec(t, id, "fill", "/data/under-the-limit", strconv.Itoa(8<<20))
	out, err := n.crictl.Run(ctx, "exec", "-s", "--timeout", "60", id, "/bin/viewer", "fill", "/data/past-the-limit", strconv.Itoa(criFill))
	if err == nil || !strings.Contains(out+err.Error(), r.full) {
		t.Fatalf("writing %d bytes in a pod's container with default_max_size %d: %v, output %q; want %s", criFill, criLimit, err, out, r.full)
	}
	n.checkLimitedStats(t, id, filepath.Join(limited[0], "fs"), r)
	n.run(t, "stop", "--timeout", "10", id)
	n.run(t, "rm", id)
	n.run(t, "stopp", pod)
	n.run(t, "rmp", pod)
	n.run(t, "rmi", ref)
	n.checkClean(t)
	if left := limitedDirs(t, n.oc.Root); len(left) > 0 {
		t.Errorf("limited snapshots left with every pod gone: %v", left)
	}
	if mnt != "" {
		// Stopped, overclone has emptied its trash (Close waits).
		stopOverclone(t, n.oc)
		loopfs.NoQuotaLeft(t, mnt)
	}
}

// checkLimitedStats compares CRI's figures for a limited container's
// writable layer with a walk of its upper, once the upper's filesystem
// has written back what the container wrote: the figures come from
// overclone's Usage, which CRI polls every 10 s (so they are waited for,
// up to three polls). Inodes must be exact, bytes within a block per
// inode. Under simple quotas an extent counts for the subvolume that
// allocated it, so the upper's extents shared with the layers below (a
// copy-up the kernel made by a reflink) count nothing: the bytes to
// compare with are then the walk's less those, as `btrfs filesystem du`
// finds them (Total less Exclusive, from FIEMAP's shared flag).
func (n *criNode) checkLimitedStats(t *testing.T, id, upper string, r limitRoot) {
	t.Helper()
	fd, err := unix.Open(upper, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = unix.Syncfs(fd)
	unix.Close(fd)
	if err != nil {
		t.Fatalf("syncfs %s: %v", upper, err)
	}
	walk, err := cfs.DiskUsage(context.Background(), upper)
	if err != nil {
		t.Fatal(err)
	}
	if walk.Size < criLimit/2 {
		t.Fatalf("the upper %s holds %d bytes after a write stopped by the %d-byte limit", upper, walk.Size, criLimit)
	}
	want, what := walk.Size, fmt.Sprintf("a walk of the upper: %d bytes", walk.Size)
	if r.quota == loopfs.SimpleQuotas {
		shared := btrfsSharedBytes(t, upper)
		want -= shared
		what += fmt.Sprintf(", %d of them shared with lower layers", shared)
	}
	var bytes, inodes uint64
	matches := func() bool {
		out := n.run(t, "stats", "-o", "json", id)
		bytes = jsonUint(t, jsonPath(t, out, "stats", 0, "writableLayer", "usedBytes", "value"))
		inodes = jsonUint(t, jsonPath(t, out, "stats", 0, "writableLayer", "inodesUsed", "value"))
		d := int64(bytes) - want
		return int64(inodes) == walk.Inodes && d >= -4096*walk.Inodes && d <= 4096*walk.Inodes
	}
	for deadline := time.Now().Add(30 * time.Second); !matches() && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
	}
	if !matches() {
		t.Errorf("crictl stats: writable layer %d bytes, %d inodes; %s, %d inodes; want the inodes, and %d bytes within a block per inode", bytes, inodes, what, walk.Inodes, want)
		return
	}
	t.Logf("crictl stats: writable layer %d bytes, %d inodes; %s, %d inodes", bytes, inodes, what, walk.Inodes)
}

// btrfsSharedBytes is how many bytes of the files under dir are in
// extents shared with other files, as `btrfs filesystem du` finds them.
func btrfsSharedBytes(t *testing.T, dir string) int64 {
	t.Helper()
	out, err := exec.Command("btrfs", "filesystem", "du", "-s", "--raw", dir).CombinedOutput()
	if err != nil {
		t.Fatalf("btrfs filesystem du %s: %v: %s", dir, err, out)
	}
	// "     Total   Exclusive  Set shared  Filename", then the numbers.
	lines := nonEmptyLines(string(out))
	f := strings.Fields(lines[len(lines)-1])
	if len(f) < 3 {
		t.Fatalf("btrfs filesystem du %s: %q", dir, out)
	}
	total, err1 := strconv.ParseInt(f[0], 10, 64)
	excl, err2 := strconv.ParseInt(f[1], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("btrfs filesystem du %s: %q", dir, out)
	}
	return total - excl
}

// qgroupSizeLimit restarts the suite's overclone on a root on btrfs with
// qgroups enabled (containerd holds none of its snapshots now) and runs a
// limited container there.
func qgroupSizeLimit(ctx context.Context, t *testing.T, s *suite, label string) {
	t.Helper()
	start := time.Now()
	defer func() { t.Logf("the btrfs-qgroup root took %v", time.Since(start).Round(time.Millisecond)) }()
	mnt := qgroupRoot.mount(t)
	if err := s.oc.Stop(); err != nil {
		t.Fatal(err)
	}
	s.oc.Root = filepath.Join(mnt, "root")
	// Stopped before the btrfs is unmounted (cleanups run last first);
	// the suite's close finds it stopped.
	t.Cleanup(func() { s.oc.Stop() })
	if err := s.oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sn := harness.SnapshotterName
	s.ctr(t, "images", "import", "--snapshotter", sn, s.f.archive)
	s.fillPastLimit(ctx, t, "limited-qgroup", []string{label, "--snapshotter", sn}, e2eFill, "disk quota exceeded")
	s.removeImages(t)
	if left := limitedDirs(t, s.oc.Root); len(left) > 0 {
		t.Errorf("limited snapshots left after containerd's GC: %v", left)
	}
	// Stopped, overclone has emptied its trash (Close waits); the
	// userspace daemon that the test goes on with is another.
	if err := s.oc.Stop(); err != nil {
		t.Fatal(err)
	}
	loopfs.NoQuotaLeft(t, mnt)
}
