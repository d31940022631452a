package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
)

// TestCRISwitchOver switches a node with a running pod from the built-in
// overlayfs to overclone in the order deploy/README.md gives, on
// containerd 1.6 (config version 2) and 2.x (version 3). Before: CRI on
// the built-in, a pod running the viewer from one image name, and a second
// name of the same image pulled but not run. The switch: start overclone,
// wait with hack/wait-overclone.sh, merge the shipped snippet into the
// node's config (on 1.6 with the image filesystem link), restart
// containerd with SIGTERM on the same root and state. After: the old pod
// still runs on overlayfs and answers exec; a new pod and a container of
// the second name start on overclone, unpacked from the content store (the
// registry no longer has that name, so nothing could be fetched); and
// removing the pods and images frees the old copies in overlayfs as well
// as the new ones in overclone.
func TestCRISwitchOver(t *testing.T) {
	f, crictlDir, pause := criSetup(t)
	eachCRIContainerd(t, func(t *testing.T, binDir, snippet string) {
		switchOver(t, f, binDir, snippet, crictlDir, pause)
	})
}

func switchOver(t *testing.T, f *fixture, binDir, snippetName, crictlDir, pause string) {
	snippet, dir, cri := criDirs(t, f, snippetName, "oc-switch-")
	// Its own pod cgroup: TestCRI may run at the same time in another
	// test binary, and the cgroup left empty is this test's proof that no
	// pod process outlived it.
	n := &criNode{sn: "overlayfs", cli: f.cliBin, img: f.img, dir: filepath.Join(dir, "ctd"), cgroup: switchCgroup}
	var oc *harness.Overclone
	t.Cleanup(func() {
		n.close(t)
		stopOverclone(t, oc)
		if err := harness.UnmountUnder(dir); err != nil {
			t.Error(err)
		}
		removeCRICgroup(n.cgroup)
		checkNoLeftovers(t, dir, n.cgroup)
		_ = os.RemoveAll(dir)
	})
	for _, sub := range []string{"oc", "ctd"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// The node before the switch: the same config the snippet is merged
	// into later, without it, so CRI uses containerd's default overlayfs.
	version := snippetVersion(t, string(snippet))
	var err error
	if n.c, err = harness.StartContainerd(ctx, n.dir, harness.ContainerdOptions{BinDir: binDir, CRI: cri, Snippet: version}, t.Logf); err != nil {
		t.Fatal(err)
	}
	if n.crictl, err = harness.NewCrictl(crictlDir, n.dir, n.c); err != nil {
		t.Fatal(err)
	}
	n.waitCRI(t)
	n.ctrCRI(t, "images", "import", "--snapshotter", "overlayfs", pause)
	running := fmt.Sprintf("%s/overclone/switch-%d-running:1", f.registry.Host, n.c.Major)
	later := fmt.Sprintf("%s/overclone/switch-%d-later:1", f.registry.Host, n.c.Major)
	pushAs(t, n.c, f.archive, running, later)
	n.run(t, "pull", running)
	n.run(t, "pull", later)
	oldPod, oldCtr := n.startPod(t, "before", running)
	oldRootfs := rootfsUpper(t, n.c, oldCtr)
	builtinRoot := filepath.Join(n.c.Root, "io.containerd.snapshotter.v1.overlayfs")
	if !strings.HasPrefix(oldRootfs, builtinRoot+"/") {
		t.Fatalf("container %s before the switch: rootfs upperdir %s, want one under %s", oldCtr, oldRootfs, builtinRoot)
	}

	// Step 1 and 2 of deploy/README.md: start overclone, wait until it
	// answers with the script the README names.
	if oc, err = harness.NewOverclone(f.overcloneBin, filepath.Join(dir, "oc"), "", t.Logf); err != nil {
		t.Fatal(err)
	}
	if err := oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	wait := exec.CommandContext(ctx, filepath.Join(repoRoot(), "hack", "wait-overclone.sh"), oc.Socket, "60")
	wait.Env = append(os.Environ(), "OVERCLONE="+f.cliBin)
	if out, err := wait.CombinedOutput(); err != nil {
		t.Fatalf("hack/wait-overclone.sh: %v\n%s", err, out)
	}
	// Step 3: merge the snippet (1.6: and make the image filesystem link)
	// and restart containerd. SIGTERM leaves the pod in its shims.
	start := time.Now()
	err = n.c.Restart(ctx, harness.ContainerdOptions{
		CRI:         cri,
		Snippet:     string(snippet),
		Proxies:     []harness.Proxy{{Name: harness.SnapshotterName, Overclone: oc}},
		LinkImageFS: n.c.Major < 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	n.sn, n.oc = harness.SnapshotterName, oc
	n.waitCRI(t)
	// deploy/README.md tells operators this warning is expected.
	if log := n.c.Tail(400); !strings.Contains(log, "The image "+later+" is not unpacked.") {
		t.Errorf("containerd's log after the restart lacks the documented warning for %s:\n%s", later, n.c.Tail(40))
	}
	t.Logf("containerd %s restarted on the merged config, CRI serving in %s", n.c.Version, time.Since(start).Round(time.Millisecond))

	// The old pod runs on, on overlayfs, and exec still reaches it.
	if state := n.run(t, "inspectp", "-o", "go-template", "--template", podStateTemplate, oldPod); state != "SANDBOX_READY" {
		t.Errorf("pod from before the switch: state %q, want SANDBOX_READY", state)
	}
	if state := n.run(t, "inspect", "-o", "go-template", "--template", ctrStateTemplate, oldCtr); state != "CONTAINER_RUNNING" {
		t.Errorf("container from before the switch: state %q, want CONTAINER_RUNNING", state)
	}
	compareView(t, "crictl exec into the container from before the switch", n.exec(t, oldCtr, "view", "/"+image.DataDir), n.img.Expected)
	if got := rootfsUpper(t, n.c, oldCtr); got != oldRootfs {
		t.Errorf("container from before the switch: rootfs upperdir %s after the restart, was %s", got, oldRootfs)
	}

	// Nothing is in overclone yet; the second name is still listed, so a
	// kubelet's IfNotPresent does not pull it again.
	if rows := nonEmptyLines(n.ctrCRI(t, "snapshots", "--snapshotter", n.sn, "ls"))[1:]; len(rows) != 0 {
		t.Errorf("overclone holds snapshots before any pod started on it: %q", rows)
	}
	n.run(t, "inspecti", later)
	// The registry forgets the second name: whatever the new container
	// gets must come from the content store.
	deleteManifest(t, f.registry.Host, later)

	start = time.Now()
	newPod, newCtr := n.startPod(t, "after", later)
	t.Logf("containerd %s: new pod and container of an image pulled before the switch started on overclone in %s (both images unpacked from the content store)",
		n.c.Version, time.Since(start).Round(time.Millisecond))
	compareView(t, "crictl exec into the container started after the switch", n.exec(t, newCtr, "view", "/"+image.DataDir), n.img.Expected)
	if oc.Mode() == "overlay" {
		if up := rootfsUpper(t, n.c, newCtr); !strings.HasPrefix(up, oc.Root+"/") {
			t.Errorf("container %s after the switch: rootfs upperdir %s, want one under overclone's root %s", newCtr, up, oc.Root)
		}
	}
	keys := snapshotKeys(t, n, harness.SnapshotterName)
	for _, id := range []string{newPod, newCtr} {
		if !keys[id] {
			t.Errorf("overclone has no snapshot %s (new pod or container); it has %v", id, keys)
		}
	}
	builtin := snapshotKeys(t, n, "overlayfs")
	if !builtin[oldCtr] {
		t.Errorf("overlayfs has no snapshot for the container from before the switch %s; it has %v", oldCtr, builtin)
	}
	// Both images were unpacked a second time, layer for layer: overclone
	// now holds the same committed chain as overlayfs.
	if got, want := committed(keys), committed(builtin); got != want || want == "\n" {
		t.Errorf("committed layers: overclone %s, overlayfs %s", got, want)
	}

	// Step 4: removing the pods and the images frees the old copies in
	// overlayfs too; the sandbox image stays, with one layer in each.
	n.run(t, "rmp", "-fa")
	n.run(t, "rmi", running, later)
	n.checkClean(t)
	old := *n
	old.sn, old.oc = "overlayfs", nil
	old.checkClean(t)
}

// switchCgroup is the cgroup parent of this test's pods.
const switchCgroup = "/overclone-e2e-switch"

// ctrStateTemplate reads a container's state from `crictl inspect`.
const ctrStateTemplate = `{{.status.state}}`

// startPod runs a host-network pod and a viewer container of ref in it, and
// checks both run.
func (n *criNode) startPod(t *testing.T, name, ref string) (pod, ctr string) {
	t.Helper()
	podCfg, ctrCfg := n.writeConfigs(t, name, ref)
	pod = n.run(t, "runp", podCfg)
	ctr = n.run(t, "create", pod, ctrCfg, podCfg)
	n.run(t, "start", ctr)
	if state := n.run(t, "inspect", "-o", "go-template", "--template", ctrStateTemplate, ctr); state != "CONTAINER_RUNNING" {
		t.Fatalf("pod %s: container %s in state %q", name, ctr, state)
	}
	return pod, ctr
}

// snippetVersion is the snippet's version line: alone, it is the node's
// config before the switch.
func snippetVersion(t *testing.T, snippet string) string {
	for _, l := range strings.Split(snippet, "\n") {
		if strings.HasPrefix(l, "version") {
			return l + "\n"
		}
	}
	t.Fatal("snippet has no version line")
	return ""
}

// pushAs puts the viewer image into the local registry under each ref,
// through this containerd's test namespace, and removes it there again.
func pushAs(t *testing.T, c *harness.Containerd, archive string, refs ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	cmds := [][]string{{"images", "import", archive}}
	for _, ref := range refs {
		cmds = append(cmds, []string{"images", "tag", imageName, ref}, []string{"images", "push", "--plain-http", ref})
	}
	cmds = append(cmds, append([]string{"images", "rm", "--sync", imageName}, refs...))
	for _, args := range cmds {
		if _, err := c.Ctr(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
}

// deleteManifest removes ref's manifest from the local registry (its
// blobs stay: another name shares them).
func deleteManifest(t *testing.T, host, ref string) {
	t.Helper()
	repo, tag, _ := strings.Cut(strings.TrimPrefix(ref, host+"/"), ":")
	url := fmt.Sprintf("http://%s/v2/%s/manifests/", host, repo)
	req, _ := http.NewRequest(http.MethodHead, url+tag, nil)
	req.Header.Set("Accept", strings.Join([]string{
		"application/vnd.oci.image.index.v1+json",
		"application/vnd.oci.image.manifest.v1+json",
		"application/vnd.docker.distribution.manifest.list.v2+json",
		"application/vnd.docker.distribution.manifest.v2+json",
	}, ", "))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	digest := resp.Header.Get("Docker-Content-Digest")
	if resp.StatusCode != http.StatusOK || digest == "" {
		t.Fatalf("HEAD %s%s: %s, digest %q", url, tag, resp.Status, digest)
	}
	req, _ = http.NewRequest(http.MethodDelete, url+digest, nil)
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("DELETE %s%s: %s", url, digest, resp.Status)
	}
	req, _ = http.NewRequest(http.MethodHead, url+tag, nil)
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("HEAD %s%s after the delete: %s, want 404", url, tag, resp.Status)
	}
}

// rootfsUpper returns the upperdir of container id's rootfs mount, which
// the shim made in the host's mount namespace under containerd's state
// dir, as /proc/self/mountinfo shows it.
func rootfsUpper(t *testing.T, c *harness.Containerd, id string) string {
	t.Helper()
	fh, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	suffix := "/" + harness.CRINamespace + "/" + id + "/rootfs"
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		// id parent major:minor root mountpoint options ... - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields := strings.Fields(pre)
		if !ok || len(fields) < 5 || !strings.HasPrefix(fields[4], c.Dir+"/") || !strings.HasSuffix(fields[4], suffix) {
			continue
		}
		sup := strings.Fields(post)
		if len(sup) < 3 || sup[0] != "overlay" {
			t.Fatalf("container %s: rootfs is %q, not an overlay", id, post)
		}
		for _, o := range strings.Split(sup[2], ",") {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok {
				return v
			}
		}
		t.Fatalf("container %s: rootfs overlay without upperdir: %s", id, post)
	}
	t.Fatalf("container %s: no rootfs mount under %s", id, c.Dir)
	return ""
}

// committed lists the committed snapshots (named by chain id) among keys.
func committed(keys map[string]bool) string {
	var c []string
	for k := range keys {
		if strings.HasPrefix(k, "sha256:") {
			c = append(c, k)
		}
	}
	return sortLines(c)
}

// snapshotKeys returns the keys of the snapshots snapshotter sn holds in
// CRI's namespace (CRI names a container's or sandbox's snapshot by its id).
func snapshotKeys(t *testing.T, n *criNode, sn string) map[string]bool {
	t.Helper()
	keys := map[string]bool{}
	for _, row := range nonEmptyLines(n.ctrCRI(t, "snapshots", "--snapshotter", sn, "ls"))[1:] {
		if f := strings.Fields(row); len(f) > 0 {
			keys[f[0]] = true
		}
	}
	return keys
}

// removeCRICgroup removes a pods' parent cgroup once runc has removed the
// containers' (cgroup v1: one per controller).
func removeCRICgroup(cgroup string) {
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cgroup))
	for _, d := range append(dirs, filepath.Join("/sys/fs/cgroup", cgroup)) {
		_ = os.Remove(d)
	}
}

// checkNoLeftovers fails if a mount or a process (a shim names
// containerd's socket under dir) outlives the cleanup, or the pods' parent
// cgroup, which runc's removal of the last container empties.
func checkNoLeftovers(t *testing.T, dir, cgroup string) {
	t.Helper()
	b, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(b), " "+dir+"/") {
		t.Errorf("mounts left under %s", dir)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if cmd, err := os.ReadFile(p); err == nil && strings.Contains(string(cmd), dir+"/") {
			t.Errorf("process left: %s %q", p, strings.ReplaceAll(string(cmd), "\x00", " "))
		}
	}
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cgroup))
	for _, d := range append(dirs, filepath.Join("/sys/fs/cgroup", cgroup)) {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("cgroup %s left (a pod's processes still in it?)", d)
		}
	}
}
