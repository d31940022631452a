package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/image/view"
	"github.com/overclone/overclone/test/require"
)

// criUsernsRounds is how many times each batch of criPods pods starts, with
// and without a user namespace, alternating.
const criUsernsRounds = 1

// TestCRIUserNamespace runs pods in a user namespace of their own
// (userns_options in the pod and container configs, as a kubelet sets them
// for hostUsers: false) through containerd 2.4's CRI, on overclone
// configured from the shipped version 3 snippet with capabilities =
// ["remap-ids"] and runc 1.5 as the runc runtime, and on the built-in
// overlayfs (idmapped layers too), the reference. The container sees the
// image as built, what it writes lands in its upper owned by the mapped
// host ids, and ten such pods, each with a mapping of its own, start at once
// in a time set against ten pods without a user namespace on the same node.
func TestCRIUserNamespace(t *testing.T) {
	f, crictlDir, pause := criSetup(t)
	runc := filepath.Join(harness.RuncBinDir(), "runc")
	if _, err := os.Stat(runc); err != nil {
		require.Skipf(t, "runc >= 1.2 missing: %v (make runc)", err)
	}
	binDir := harness.Containerd2BinDir()
	if m := harness.Missing(binDir, harness.ContainerdTools...); m != "" {
		require.Skipf(t, "containerd missing: %s (make containerd2 builds 2.x)", m)
	}
	snippet, dir, cri := criDirs(t, f, "config-v3.toml", "oc-criu-")
	cri.RuncBinary = runc
	const noCaps = "capabilities = []"
	if !strings.Contains(string(snippet), noCaps) {
		t.Fatalf("deploy/containerd/config-v3.toml has no %q to turn into remap-ids", noCaps)
	}
	config := strings.Replace(string(snippet), noCaps, `capabilities = ["remap-ids"]`, 1)
	var tm harness.Timings
	var nodes []*criNode
	var oc *harness.Overclone
	cleanupCRI(t, dir, &nodes, &oc)
	// The containers' roots are mapped: runc, in their user namespace,
	// must get through to the rootfs under containerd's state dir.
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	for _, sub := range []string{"oc", "ctd-oc", "ctd-builtin"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o711); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var err error
	if oc, err = harness.NewOverclone(f.overcloneBin, filepath.Join(dir, "oc"), "", t.Logf); err != nil {
		t.Fatal(err)
	}
	if err := oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// The built-in overlayfs, the reference: what a user namespace costs
	// containerd and runc whatever the snapshotter.
	for _, sn := range []string{"overlayfs", harness.SnapshotterName} {
		n := &criNode{sn: sn, cli: f.cliBin, img: f.img, tm: &tm, dir: filepath.Join(dir, "ctd-builtin")}
		opts := harness.ContainerdOptions{BinDir: binDir, CRI: cri}
		if sn == harness.SnapshotterName {
			n.oc, n.dir = oc, filepath.Join(dir, "ctd-oc")
			opts.Snippet = config
			opts.Proxies = []harness.Proxy{{Name: sn, Overclone: oc}}
		}
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
	ref := fmt.Sprintf("%s/overclone/cri-userns:1", f.registry.Host)
	nodes[0].push(t, f.archive, ref)

	for _, n := range nodes {
		n.run(t, "pull", ref)
		t.Run(n.sn+"-pod", func(t *testing.T) {
			podCfg, ctrCfg := n.writeUsernsConfigs(t, "userns", ref, usernsHostRoot)
			pod := n.run(t, "runp", podCfg)
			id := n.run(t, "create", pod, ctrCfg, podCfg)
			n.run(t, "start", id)
			compareView(t, "user-namespaced pod's view", n.exec(t, id, "view", "/"+image.DataDir), f.img.Expected)
			compareView(t, "user-namespaced pod's view after its writes", n.exec(t, id, "write", "/"+image.DataDir), expectedAfterWrite(t, f.img.Expected))
			upper := upperOf(t, n.ctrCRI(t, "snapshots", "--snapshotter", n.sn, "mounts", "/mnt", id))
			mapped := fmt.Sprintf("%d:%d", usernsHostRoot, usernsHostRoot)
			for _, p := range []string{".", image.DataDir + "/" + view.CreatedFile} {
				if got := ownerOf(filepath.Join(upper, p)); got != mapped {
					t.Errorf("%s in the upper %s owned by %s, want the mapped %s", p, upper, got, mapped)
				}
			}
			n.run(t, "rmp", "-fa")
		})
	}

	// Ten pods at once, each with a mapping of its own as a kubelet
	// gives them, against ten without, on each node.
	for round := 0; round < criUsernsRounds; round++ {
		for _, n := range alternateNodes(nodes, round) {
			for i, userns := range []bool{round%2 == 1, round%2 == 0} {
				name := "plain"
				if userns {
					name = "userns"
				}
				t.Run(fmt.Sprintf("%s-%s-pods-%d", n.sn, name, round), func(t *testing.T) {
					n.startPods(t, ref, fmt.Sprintf("%s-%d-%d", name, round, i), userns)
				})
			}
		}
	}
	for _, n := range nodes {
		n.run(t, "rmi", ref)
		n.checkClean(t)
	}
	t.Logf("CRI timings with and without a user namespace (crictl wall time):\n%s", tm.Table())
}

// writeUsernsConfigs writes the configs writeConfigs writes, and, when
// host is not 0, gives the pod and its container a user namespace mapping
// 65536 ids from host, as a kubelet does for hostUsers: false.
func (n *criNode) writeUsernsConfigs(t *testing.T, name, ref string, host int) (pod, ctr string) {
	t.Helper()
	pod, ctr = n.writeConfigs(t, name, ref)
	if host == 0 {
		return pod, ctr
	}
	ids := []map[string]any{{"container_id": 0, "host_id": host, "length": 65536}}
	userns := map[string]any{"mode": 0 /* POD */, "uids": ids, "gids": ids}
	for _, p := range []string{pod, ctr} {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		var cfg map[string]any
		if err := json.Unmarshal(b, &cfg); err != nil {
			t.Fatal(err)
		}
		linux := cfg["linux"].(map[string]any)
		sc := linux["security_context"].(map[string]any)
		ns := map[string]any{}
		for k, v := range sc["namespace_options"].(map[string]any) {
			ns[k] = v
		}
		ns["userns_options"] = userns
		// The pod and container configs share one map: each gets its own.
		scCopy := map[string]any{}
		for k, v := range sc {
			scCopy[k] = v
		}
		scCopy["namespace_options"] = ns
		linux["security_context"] = scCopy
		if b, err = json.Marshal(cfg); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return pod, ctr
}

// startPods starts criPods pods of ref at once, each with a user namespace
// of its own when userns, records the time, checks they run and removes
// them.
func (n *criNode) startPods(t *testing.T, ref, prefix string, userns bool) {
	ids := make([]string, criPods)
	errs := make([]error, criPods)
	cfgs := make([][2]string, criPods)
	for i := range cfgs {
		host := 0
		if userns {
			host = usernsHostRoot + (i+1)*65536
		}
		pod, ctr := n.writeUsernsConfigs(t, fmt.Sprintf("%s-%d", prefix, i), ref, host)
		cfgs[i] = [2]string{pod, ctr}
	}
	var wg sync.WaitGroup
	unix.Sync()
	start := time.Now()
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			pod, err := n.crictl.Run(ctx, "runp", cfgs[i][0])
			if err != nil {
				errs[i] = err
				return
			}
			id, err := n.crictl.Run(ctx, "create", strings.TrimSpace(pod), cfgs[i][1], cfgs[i][0])
			if err != nil {
				errs[i] = err
				return
			}
			ids[i] = strings.TrimSpace(id)
			_, errs[i] = n.crictl.Run(ctx, "start", ids[i])
		}()
	}
	wg.Wait()
	op := fmt.Sprintf("%d pods at once (runp+create+start)", criPods)
	if userns {
		op = fmt.Sprintf("%d userns pods at once (runp+create+start)", criPods)
	}
	n.record(t, op, time.Since(start))
	n.checkPodsRunning(t, prefix, ids, errs)
}
