package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// e2eLimit is the limit the containers run with; e2eFill is past it.
const (
	e2eLimit = 40 << 20
	e2eFill  = 80 << 20
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
//     no subvolume in snapshots/;
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
	out, err := s.c.Ctr(ctx, append([]string{"run", "--rm", label, "--snapshotter", sn, imageName, "limited"}, fill...)...)
	if err == nil || !strings.Contains(out+err.Error(), "no space left on device") {
		t.Fatalf("writing %d bytes in a container limited to %d: %v, output %q; want no space left on device", e2eFill, e2eLimit, err, out)
	}
	s.ctr(t, append([]string{"run", "--rm", "--snapshotter", sn, imageName, "unlimited"}, fill...)...)
	// containerd removes a container's snapshot from the snapshotter in
	// its garbage collection; images rm --sync runs one and waits.
	s.removeImages(t)
	if left := mountsUnder(t, s.oc.Root+"/snapshots/"); len(left) > 0 {
		t.Errorf("mounts left after containerd's GC: %v", left)
	}
	qgroupSizeLimit(ctx, t, s, label, fill)

	us := harness.UserspaceName
	s.ctr(t, "images", "import", "--snapshotter", us, s.f.archive)
	out, err = s.c.Ctr(ctx, append([]string{"run", "--rm", label, "--snapshotter", us, imageName, "userspace"}, fill...)...)
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

// TestCRISizeLimit runs a pod through containerd 2.x's CRI plugin, as a
// kubelet does, on the shipped config-v3 snippet with overclone started
// with default_max_size: CRI cannot pass the max-size label yet, so the
// default is what limits a pod's containers. A write past it fails inside
// the container; the pod's figures in crictl stats come from the image's
// counters; once the pod and the image are removed, no image stays
// mounted. The pod carries the annotation containerd.io/snapshot/max-size
// "0", which CRI passes to its sandbox's snapshot alone (README "Size
// limits and Usage"): the pause container gets no image, the pod's
// container still does.
func TestCRISizeLimit(t *testing.T) {
	f, crictlDir, pause := criSetup(t)
	binDir := harness.Containerd2BinDir()
	if m := harness.Missing(binDir, harness.ContainerdTools...); m != "" {
		require.Skipf(t, "containerd 2.x missing: %s (make containerd2)", m)
	}
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
	if n.oc, err = harness.NewOverclone(f.overcloneBin, filepath.Join(dir, "oc"), "default_max_size = "+strconv.Itoa(e2eLimit)+"\n", t.Logf); err != nil {
		t.Fatal(err)
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
	if m := mountsUnder(t, n.oc.Root+"/snapshots/"); len(m) != 0 {
		t.Errorf("the sandbox, annotated %s=0, got an image: %v", snapshots.LabelSnapshotMaxSize, m)
	}
	id := n.run(t, "create", pod, ctrCfg, podCfg)
	if m := mountsUnder(t, n.oc.Root+"/snapshots/"); len(m) != 1 {
		t.Errorf("with the pod's container created, images mounted: %v; want the container's alone", m)
	}
	n.run(t, "start", id)
	out, err := n.crictl.Run(ctx, "exec", "-s", "--timeout", "60", id, "/bin/viewer", "fill", "/data/past-the-limit", strconv.Itoa(e2eFill))
	if err == nil || !strings.Contains(out+err.Error(), "no space left on device") {
		t.Fatalf("writing %d bytes in a pod's container with default_max_size %d: %v, output %q; want no space left on device", e2eFill, e2eLimit, err, out)
	}
	// CRI's figure for the writable layer is the image's: the file up to
	// where the limit stopped it.
	var used uint64
	for deadline := time.Now().Add(30 * time.Second); used < e2eLimit/2 && time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		used = jsonUint(t, jsonPath(t, n.run(t, "stats", "-o", "json", id), "stats", 0, "writableLayer", "usedBytes", "value"))
	}
	if used < e2eLimit/2 || used > e2eLimit {
		t.Errorf("crictl stats: writable layer %d bytes, want most of the %d-byte limit the write filled", used, e2eLimit)
	}
	n.run(t, "stop", "--timeout", "10", id)
	n.run(t, "rm", id)
	n.run(t, "stopp", pod)
	n.run(t, "rmp", pod)
	n.run(t, "rmi", ref)
	n.checkClean(t)
	if left := mountsUnder(t, n.oc.Root+"/snapshots/"); len(left) > 0 {
		t.Errorf("images still mounted with every pod gone: %v", left)
	}
}

// qgroupSizeLimit restarts the suite's overclone on a root on btrfs with
// qgroups enabled (containerd holds none of its snapshots now) and runs a
// limited container there.
func qgroupSizeLimit(ctx context.Context, t *testing.T, s *suite, label string, fill []string) {
	t.Helper()
	start := time.Now()
	defer func() { t.Logf("the btrfs-qgroup root took %v", time.Since(start).Round(time.Millisecond)) }()
	mnt := loopfs.Mount(t, loopfs.Btrfs)
	loopfs.EnableQuotas(t, mnt, loopfs.Qgroups)
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
	out, err := s.c.Ctr(ctx, append([]string{"run", "--rm", label, "--snapshotter", sn, imageName, "limited-qgroup"}, fill...)...)
	if err == nil || !strings.Contains(out+err.Error(), "disk quota exceeded") {
		t.Fatalf("writing %d bytes in a container limited to %d on a btrfs root with qgroups: %v, output %q; want disk quota exceeded\n%s", e2eFill, e2eLimit, err, out, s.oc.Tail(20))
	}
	s.removeImages(t)
	entries, err := os.ReadDir(filepath.Join(s.oc.Root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(s.oc.Root, "snapshots", e.Name()), &st); err == nil && st.Ino == 256 {
			t.Errorf("subvolume snapshots/%s left after containerd's GC", e.Name())
		}
	}
}
