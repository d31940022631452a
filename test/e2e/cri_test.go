package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/require"
	"golang.org/x/sys/unix"
)

// criRounds is how many times each node runs the timed flow; the table
// shows the medians.
const criRounds = 5

// criPods is how many pods of one image TestCRI starts at once.
const criPods = 10

// criCgroup is the cgroup parent of the test pods, removed at the end.
const criCgroup = "/overclone-e2e-cri"

// fillSize is what a container writes to check that CRI's figures for its
// writable layer follow overclone's Usage.
const fillSize = 8 << 20

// TestCRI drives containerd's CRI plugin with crictl as a kubelet does, on
// containerd 1.6 (config version 2) and 2.x (version 3), each time on two
// private containerds side by side: one configured from the shipped
// deploy/containerd snippet with overclone, one on the built-in overlayfs.
// Pods are host-network (no CNI), the sandbox image is a local pause image
// imported into k8s.io and the viewer image is pulled from the local
// registry through CRI's hosts.toml. Each node pulls, runs a pod, creates
// and starts a container, execs into it (reads, writes, renames a lower
// dir, deletes a lower file), reads its logs, stats and the image
// filesystem, removes it all and is left with nothing but the sandbox
// image; then ten pods start at once. The timings go to
// results/cri-timings.txt.
func TestCRI(t *testing.T) {
	f, crictlDir, pause := criSetup(t)
	var tm harness.Timings
	eachCRIContainerd(t, func(t *testing.T, binDir, snippet string) {
		runCRI(t, f, binDir, snippet, crictlDir, pause, &tm)
	})
	if tm.Empty() {
		return
	}
	table := tm.Table()
	t.Logf("CRI timings, medians of %d (crictl wall time):\n%s", criRounds, table)
	path := filepath.Join(repoRoot(), "results", "cri-timings.txt")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err == nil {
		_ = os.WriteFile(path, []byte(table), 0o644)
	}
}

// criSetup is what every CRI test needs first: crictl, and the pause
// image it names as the sandbox image.
func criSetup(t *testing.T) (f *fixture, crictlDir, pause string) {
	f = getFixture(t)
	crictlDir = harness.CrictlBinDir()
	if m := harness.Missing(crictlDir, "crictl"); m != "" {
		require.Skipf(t, "crictl missing: %s (make crictl)", m)
	}
	_, pause, err := harness.BuildPauseImage(f.dir, repoRoot())
	if err != nil {
		t.Fatal(err)
	}
	return f, crictlDir, pause
}

// eachCRIContainerd runs fn as a subtest for containerd 1.6 with the
// shipped config version 2 snippet and 2.x with version 3.
func eachCRIContainerd(t *testing.T, fn func(t *testing.T, binDir, snippet string)) {
	for _, v := range []struct{ name, binDir, snippet string }{
		{"containerd-1.6", harness.Containerd16Bin, "config-v2.toml"},
		{"containerd-2", harness.Containerd2BinDir(), "config-v3.toml"},
	} {
		t.Run(v.name, func(t *testing.T) {
			if m := harness.Missing(v.binDir, harness.ContainerdTools...); m != "" {
				require.Skipf(t, "containerd missing: %s (make containerd2 builds 2.x)", m)
			}
			fn(t, v.binDir, v.snippet)
		})
	}
}

// criDirs reads the shipped snippet, makes the test's directory (named
// prefix*) and in it the registry's hosts.toml, and returns the CRI
// settings every node of the test shares.
func criDirs(t *testing.T, f *fixture, snippetName, prefix string) ([]byte, string, *harness.CRI) {
	snippet, err := os.ReadFile(filepath.Join(repoRoot(), "deploy", "containerd", snippetName))
	if err != nil {
		t.Fatal(err)
	}
	dir, err := harness.TempDir(prefix)
	if err != nil {
		t.Fatal(err)
	}
	hosts := filepath.Join(dir, "hosts")
	if err := harness.WriteRegistryHosts(hosts, f.registry.Host); err != nil {
		t.Fatal(err)
	}
	return snippet, dir, &harness.CRI{SandboxImage: harness.PauseImageName, HostsDir: hosts}
}

// stopOverclone stops a test's overclone, if it started one, with the
// tail of its log when the test failed.
func stopOverclone(t *testing.T, oc *harness.Overclone) {
	if oc == nil {
		return
	}
	if t.Failed() {
		t.Logf("overclone log:\n%s", oc.Tail(40))
	}
	if err := oc.Stop(); err != nil {
		t.Error(err)
	}
}

// criNode is one private containerd with CRI on, and crictl pointed at it.
type criNode struct {
	sn     string // the snapshotter CRI uses
	c      *harness.Containerd
	oc     *harness.Overclone // nil on the built-in's node
	crictl *harness.Crictl
	dir    string
	cli    string // the overclone admin tool
	img    *image.Image
	tm     *harness.Timings
	cgroup string // the pods' cgroup parent; criCgroup if ""
	// podAnnotations go on every pod (a kubelet passes a pod's
	// annotations to RunPodSandbox).
	podAnnotations map[string]string
}

func runCRI(t *testing.T, f *fixture, binDir, snippetName, crictlDir, pause string, tm *harness.Timings) {
	snippet, dir, cri := criDirs(t, f, snippetName, "oc-cri-")
	var nodes []*criNode
	var oc *harness.Overclone
	cleanupCRI(t, dir, &nodes, &oc)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, sub := range []string{"oc", "ctd-oc", "ctd-builtin"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if oc, err = harness.NewOverclone(f.overcloneBin, filepath.Join(dir, "oc"), "", t.Logf); err != nil {
		t.Fatal(err)
	}
	if err := oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for _, sn := range []string{"overlayfs", harness.SnapshotterName} {
		opts := harness.ContainerdOptions{BinDir: binDir, CRI: cri}
		sub := "ctd-builtin"
		n := &criNode{sn: sn, cli: f.cliBin, img: f.img, tm: tm}
		if sn == harness.SnapshotterName {
			sub, n.oc = "ctd-oc", oc
			opts.Proxies = []harness.Proxy{{Name: sn, Overclone: oc}}
			opts.Snippet = string(snippet)
			// The documented set-up for config version 2, where
			// containerd 1.6 ignores exports (deploy/README.md).
			opts.LinkImageFS = snippetName == "config-v2.toml"
		}
		n.dir = filepath.Join(dir, sub)
		if n.c, err = harness.StartContainerd(ctx, n.dir, opts, t.Logf); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
		if n.crictl, err = harness.NewCrictl(crictlDir, n.dir, n.c); err != nil {
			t.Fatal(err)
		}
		n.waitCRI(t)
		n.ctrCRI(t, "images", "import", "--snapshotter", sn, pause)
	}
	ref := fmt.Sprintf("%s/overclone/cri-%d:1", f.registry.Host, nodes[0].c.Major)
	nodes[0].push(t, f.archive, ref)

	for round := 0; round < criRounds; round++ {
		for _, n := range alternateNodes(nodes, round) {
			if !t.Run(fmt.Sprintf("%s-%d", n.sn, round), func(t *testing.T) { n.flow(t, ref, round) }) {
				t.FailNow()
			}
		}
	}
	for _, n := range nodes {
		t.Run(n.sn+"-pods", func(t *testing.T) { n.pods(t, ref) })
	}
}

func alternateNodes(nodes []*criNode, round int) []*criNode {
	if round%2 == 0 {
		return nodes
	}
	return []*criNode{nodes[1], nodes[0]}
}

// close removes every pod CRI still has (their shims outlive containerd)
// and stops containerd.
func (n *criNode) close(t *testing.T) {
	if n.c == nil {
		return
	}
	if n.crictl != nil && n.c.Running() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if _, err := n.crictl.Run(ctx, "rmp", "-fa"); err != nil {
			t.Error(err)
		}
		cancel()
	}
	if t.Failed() {
		t.Logf("containerd (%s) log:\n%s", n.sn, n.c.Tail(40))
	}
	if err := n.c.Stop(); err != nil {
		t.Error(err)
	}
}

func (n *criNode) run(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	out, err := n.crictl.Run(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// timed runs crictl after a sync (see suite.timed) and records the time.
func (n *criNode) timed(t *testing.T, op string, args ...string) string {
	t.Helper()
	unix.Sync()
	start := time.Now()
	out := n.run(t, args...)
	n.record(t, op, time.Since(start))
	return out
}

// checkPodsRunning reports the errors of pods started at once (pod
// <prefix>-i got container ids[i], or errs[i]), checks that every
// container made is running, and removes all pods.
func (n *criNode) checkPodsRunning(t *testing.T, prefix string, ids []string, errs []error) {
	t.Helper()
	for _, err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	running := map[string]bool{}
	list, _ := jsonPath(t, n.run(t, "ps", "-o", "json", "--state", "Running"), "containers").([]any)
	for _, c := range list {
		running[c.(map[string]any)["id"].(string)] = true
	}
	for i, id := range ids {
		if id != "" && !running[id] {
			t.Errorf("pod %s-%d: container %s not running", prefix, i, id)
		}
	}
	n.run(t, "rmp", "-fa")
}

func (n *criNode) record(t *testing.T, op string, d time.Duration) {
	n.tm.Add(n.c.Version, op, n.sn, d)
	t.Logf("%s %s: %s", op, n.sn, d.Round(time.Millisecond))
}

func (n *criNode) ctrCRI(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	out, err := n.c.CtrIn(ctx, harness.CRINamespace, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// waitCRI waits for CRI to serve: containerd answers ctr before its CRI
// plugin has loaded its state.
func (n *criNode) waitCRI(t *testing.T) {
	t.Helper()
	var err error
	for i := 0; i < 100; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = n.crictl.Run(ctx, "version")
		cancel()
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("CRI of containerd %s (%s) not serving: %v", n.c.Version, n.sn, err)
	}
	// The first check README's "Checks after a switch-over" gives. 2.x
	// prints the runc runtime's snapshotter, not the image service's: the
	// snippet sets both, the built-in's node leaves it "" (the default).
	if n.oc == nil {
		return
	}
	if info, want := n.run(t, "info"), `"snapshotter": "`+n.sn+`"`; !strings.Contains(info, want) {
		t.Errorf("crictl info lacks %s:\n%s", want, info)
	}
}

// Go templates README's "Checks after a switch-over" gives to crictl.
const (
	imageFSTemplate  = `{{range .status.imageFilesystems}}{{.fsId.mountpoint}}{{end}}`
	podStateTemplate = `{{.status.state}}`
)

// push puts the viewer image into the local registry, through this
// containerd's test namespace, and removes it there again.
func (n *criNode) push(t *testing.T, archive, ref string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	for _, args := range [][]string{
		{"images", "import", archive},
		{"images", "tag", imageName, ref},
		{"images", "push", "--plain-http", ref},
		{"images", "rm", "--sync", imageName, ref},
	} {
		if _, err := n.c.Ctr(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
}

// writeConfigs writes the pod and container configs crictl takes for pod
// name: host network (no CNI), the viewer sleeping until SIGTERM.
func (n *criNode) writeConfigs(t *testing.T, name, ref string) (pod, ctr string) {
	t.Helper()
	cgroup := criCgroup
	if n.cgroup != "" {
		cgroup = n.cgroup
	}
	hostNet := map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}}
	podCfg := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": harness.Namespace, "uid": name + "-uid", "attempt": 0},
		"log_directory": filepath.Join(n.dir, "pod-logs", name),
		"linux": map[string]any{
			"security_context": hostNet["security_context"],
			// As a kubelet sets it: without a cgroup CRI has no
			// figures for the pod and statsp fails.
			"cgroup_parent": cgroup,
		},
	}
	if n.podAnnotations != nil {
		podCfg["annotations"] = n.podAnnotations
	}
	ctrCfg := map[string]any{
		"metadata": map[string]any{"name": "viewer"},
		"image":    map[string]any{"image": ref},
		"command":  []string{"/bin/viewer", "sleep"},
		"log_path": "viewer.log",
		"linux":    hostNet,
	}
	pod, ctr = filepath.Join(n.dir, name+"-pod.json"), filepath.Join(n.dir, name+"-ctr.json")
	for p, v := range map[string]any{pod: podCfg, ctr: ctrCfg} {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return pod, ctr
}

// flow is one kubelet-like pass: pull, run a pod and a container, check
// it (first round only), remove everything, check nothing is left.
func (n *criNode) flow(t *testing.T, ref string, round int) {
	n.timed(t, "crictl pull (fetch + unpack)", "pull", ref)
	name := fmt.Sprintf("flow-%d", round)
	podCfg, ctrCfg := n.writeConfigs(t, name, ref)
	pod := n.timed(t, "crictl runp", "runp", podCfg)
	if state := n.run(t, "inspectp", "-o", "go-template", "--template", podStateTemplate, pod); state != "SANDBOX_READY" {
		t.Errorf("pod %s: state %q, want SANDBOX_READY", pod, state)
	}
	unix.Sync()
	start := time.Now()
	id := n.run(t, "create", pod, ctrCfg, podCfg)
	n.run(t, "start", id)
	n.record(t, "crictl create + start", time.Since(start))
	if round == 0 {
		n.checkLogs(t, id)
		n.checkExec(t, id)
		n.checkStats(t, id, pod)
		n.checkImageFS(t)
	}
	n.timed(t, "crictl stats", "stats", "-o", "json", id)
	n.run(t, "stop", "--timeout", "10", id)
	n.run(t, "rm", id)
	n.run(t, "stopp", pod)
	n.run(t, "rmp", pod)
	n.run(t, "rmi", ref)
	n.checkClean(t)
}

// exec runs the viewer in container id and returns its stdout.
func (n *criNode) exec(t *testing.T, id string, args ...string) string {
	t.Helper()
	return n.run(t, append([]string{"exec", "-s", "--timeout", "60", id, "/bin/viewer"}, args...)...) + "\n"
}

// checkExec reads the image's files, changes lower files (append, chmod,
// delete) and adds new ones, renames a dir the lower layers merge, and
// compares each view with what the image model says.
func (n *criNode) checkExec(t *testing.T, id string) {
	data := "/" + image.DataDir
	compareView(t, "crictl exec viewer view ("+n.sn+")", n.exec(t, id, "view", data), n.img.Expected)
	written := expectedAfterWrite(t, n.img.Expected)
	compareView(t, "crictl exec viewer write ("+n.sn+")", n.exec(t, id, "write", data), written)
	// data/merged holds a file of layer 3 in a dir of layers 1 and 4.
	n.exec(t, id, "rename", data+"/merged", data+"/merged-renamed")
	compareView(t, "view after renaming a lower dir ("+n.sn+")", n.exec(t, id, "view", data), renamedView(written, "merged", "merged-renamed"))
}

// renamedView is view with the entries under dir moved to newDir.
func renamedView(view, dir, newDir string) string {
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(view), "\n") {
		p := strings.Fields(l)[0]
		if p == dir || strings.HasPrefix(p, dir+"/") {
			l = newDir + strings.TrimPrefix(l, dir)
		}
		lines = append(lines, l)
	}
	return sortLines(lines)
}

func (n *criNode) checkLogs(t *testing.T, id string) {
	var out string
	for i := 0; i < 50; i++ {
		if out = n.run(t, "logs", id); strings.Contains(out, "ready") {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("crictl logs %s: %q, want the viewer's \"ready\"", id, out)
}

// checkStats writes fillSize bytes in the container and waits for CRI's
// figure of its writable layer, which it takes from the snapshotter's
// Usage, to grow by that much, in `crictl stats` and `crictl statsp`.
func (n *criNode) checkStats(t *testing.T, id, pod string) {
	stats := func() uint64 {
		return jsonUint(t, jsonPath(t, n.run(t, "stats", "-o", "json", id), "stats", 0, "writableLayer", "usedBytes", "value"))
	}
	statsp := func() uint64 {
		return jsonUint(t, jsonPath(t, n.run(t, "statsp", "-o", "json", pod), "stats", 0, "linux", "containers", 0, "writableLayer", "usedBytes", "value"))
	}
	before := stats()
	n.exec(t, id, "fill", "/data/filled", strconv.Itoa(fillSize))
	for what, get := range map[string]func() uint64{"stats": stats, "statsp": statsp} {
		var got uint64
		deadline := time.Now().Add(30 * time.Second)
		for got = get(); got < before+fillSize && time.Now().Before(deadline); got = get() {
			time.Sleep(200 * time.Millisecond)
		}
		// The write allocates its size and a few blocks of metadata.
		if got < before+fillSize || got > before+fillSize+1<<20 {
			t.Errorf("crictl %s (%s): writable layer %d bytes after writing %d to a layer of %d", what, n.sn, got, fillSize, before)
		} else {
			t.Logf("crictl %s (%s): writable layer %d -> %d bytes after writing %d", what, n.sn, before, got, fillSize)
		}
	}
}

// checkImageFS checks what CRI reports as the image filesystem: a path
// that exists and lies on the snapshotter's root (the kubelet stats it for
// capacity and image GC thresholds), and a usage that covers the image.
func (n *criNode) checkImageFS(t *testing.T) {
	out := n.run(t, "imagefsinfo", "-o", "json")
	fs := jsonPath(t, out, "status", "imageFilesystems", 0)
	mp, _ := jsonPath(t, out, "status", "imageFilesystems", 0, "fsId", "mountpoint").(string)
	used := jsonUint(t, fs.(map[string]any)["usedBytes"].(map[string]any)["value"])
	root := filepath.Join(n.c.Root, "io.containerd.snapshotter.v1.overlayfs")
	want := root
	if n.oc != nil {
		root = n.oc.Root
		want = root
		if n.c.Major < 2 {
			// 1.6 ignores exports: the documented symlink.
			want = harness.ImageFSLink(n.c.Root, n.sn)
		}
	}
	if mp != want {
		t.Errorf("imagefsinfo (%s): mountpoint %q, want %q", n.sn, mp, want)
	}
	if got := n.run(t, "imagefsinfo", "-o", "go-template", "--template", imageFSTemplate); got != mp {
		t.Errorf("imagefsinfo (%s) with README's template: %q, want %q", n.sn, got, mp)
	}
	resolved, err := filepath.EvalSymlinks(mp)
	if err != nil || resolved != root {
		t.Errorf("imagefsinfo (%s): mountpoint %q resolves to %q (%v), want %q", n.sn, mp, resolved, err, root)
	}
	var st, rootSt unix.Stat_t
	var fsStat, rootFs unix.Statfs_t
	if err := unix.Stat(mp, &st); err != nil {
		t.Fatalf("imagefsinfo (%s): the kubelet cannot stat %s: %v", n.sn, mp, err)
	}
	if err := unix.Statfs(mp, &fsStat); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(root, &rootSt); err != nil {
		t.Fatal(err)
	}
	if err := unix.Statfs(root, &rootFs); err != nil {
		t.Fatal(err)
	}
	if st.Dev != rootSt.Dev || fsStat.Fsid != rootFs.Fsid {
		t.Errorf("imagefsinfo (%s): %s is on device %d fsid %v, the root %s on %d fsid %v", n.sn, mp, st.Dev, fsStat.Fsid, root, rootSt.Dev, rootFs.Fsid)
	}
	onDisk := diskUsage(t, root)
	if used < image.BigSize || int64(used) > onDisk+4<<20 {
		t.Errorf("imagefsinfo (%s): %d bytes used, want at least the image's %d and at most the root's %d", n.sn, used, image.BigSize, onDisk)
	}
	t.Logf("imagefsinfo (%s): %s (resolves to %s, device %d) %d bytes used; the root holds %d", n.sn, mp, resolved, st.Dev, used, onDisk)
}

// checkClean checks that, with the viewer image and its containers gone,
// the snapshotter holds the sandbox image's one layer and nothing else,
// on disk too (overclone: and `overclone gc --dry-run` finds no orphan).
// containerd's collector and overclone's trash run in the background, so
// both are polled for a while.
func (n *criNode) checkClean(t *testing.T) {
	t.Helper()
	dir := filepath.Join(n.c.Root, "io.containerd.snapshotter.v1.overlayfs", "snapshots")
	if n.oc != nil {
		dir = filepath.Join(n.oc.Root, "snapshots")
	}
	var rows, entries []string
	orphans := "\n0 orphans"
	for i := 0; i < 100; i++ {
		rows = nonEmptyLines(n.ctrCRI(t, "snapshots", "--snapshotter", n.sn, "ls"))[1:]
		des, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		entries = entries[:0]
		for _, de := range des {
			entries = append(entries, de.Name())
		}
		if n.oc != nil {
			orphans = gcDryRun(t, n.cli, n.oc)
		}
		if len(rows) == 1 && len(entries) == 1 && strings.Contains(orphans, "\n0 orphans") {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("%s after rmi: snapshots %q, %s holds %q (want the sandbox image's one layer); gc --dry-run:%s", n.sn, rows, dir, entries, orphans)
}

func gcDryRun(t *testing.T, cli string, oc *harness.Overclone) string {
	t.Helper()
	s := &suite{f: &fixture{cliBin: cli}}
	return s.orphans(t, oc)
}

func nonEmptyLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) != "" {
			out = append(out, l)
		}
	}
	if len(out) == 0 {
		return []string{""}
	}
	return out
}

// pods starts criPods pods of the image at once, each with a container,
// checks all run, and removes them.
func (n *criNode) pods(t *testing.T, ref string) {
	n.run(t, "pull", ref)
	ids := make([]string, criPods)
	errs := make([]error, criPods)
	var wg sync.WaitGroup
	unix.Sync()
	start := time.Now()
	for i := range ids {
		podCfg, ctrCfg := n.writeConfigs(t, fmt.Sprintf("many-%d", i), ref)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			pod, err := n.crictl.Run(ctx, "runp", podCfg)
			if err != nil {
				errs[i] = err
				return
			}
			id, err := n.crictl.Run(ctx, "create", strings.TrimSpace(pod), ctrCfg, podCfg)
			if err != nil {
				errs[i] = err
				return
			}
			ids[i] = strings.TrimSpace(id)
			_, errs[i] = n.crictl.Run(ctx, "start", ids[i])
		}()
	}
	wg.Wait()
	n.record(t, fmt.Sprintf("%d pods at once (runp+create+start)", criPods), time.Since(start))
	n.checkPodsRunning(t, "many", ids, errs)
	n.run(t, "rmi", ref)
	n.checkClean(t)
}

// jsonPath walks crictl's JSON output by keys and indexes.
func jsonPath(t *testing.T, out string, path ...any) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("crictl output is not JSON: %v\n%s", err, out)
	}
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				t.Fatalf("no %q in %v (path %v)\n%s", k, v, path, out)
			}
			v = m[k]
		case int:
			a, ok := v.([]any)
			if !ok || len(a) <= k {
				t.Fatalf("no [%d] in %v (path %v)\n%s", k, v, path, out)
			}
			v = a[k]
		}
	}
	return v
}

// jsonUint reads a protobuf uint64, which JSON carries as a string.
func jsonUint(t *testing.T, v any) uint64 {
	t.Helper()
	switch x := v.(type) {
	case string:
		n, err := strconv.ParseUint(x, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	case float64:
		return uint64(x)
	}
	t.Fatalf("not a number: %v", v)
	return 0
}

// cleanupCRI, when the test ends, closes the nodes and overclone the test
// has started by then (it fills *nodes and *oc as it goes), and removes
// dir with what is mounted under it and the pods' cgroup.
func cleanupCRI(t *testing.T, dir string, nodes *[]*criNode, oc **harness.Overclone) {
	t.Cleanup(func() {
		for _, n := range *nodes {
			n.close(t)
		}
		stopOverclone(t, *oc)
		if err := harness.UnmountUnder(dir); err != nil {
			t.Error(err)
		}
		_ = os.RemoveAll(dir)
		removeCRICgroup(criCgroup)
	})
}
