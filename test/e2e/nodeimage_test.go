package e2e

import (
	"context"
	"errors"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/hack/nodeimage"
	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"
)

// daemonSet is what the tests read of deploy/kubernetes's manifest: the
// fields of a Namespace, ConfigMap and DaemonSet they check, no more (the
// module does not depend on k8s.io/api).
type daemonSet struct {
	configToml string
	image      string
	pullPolicy string
	command    []string
	privileged bool
	readiness  []string
	liveness   []string
	mounts     map[string]string // volume name -> mountPath
	propagate  map[string]string // volume name -> mountPropagation
	hostPaths  map[string]string // volume name -> hostPath
	configMap  string            // the config volume's ConfigMap
	cmName     string            // the ConfigMap the file defines
}

type k8sObject struct {
	Kind     string                `yaml:"kind"`
	Metadata struct{ Name string } `yaml:"metadata"`
	Data     map[string]string     `yaml:"data"`
	Spec     struct {
		Template struct {
			Spec struct {
				Containers []struct {
					Image           string   `yaml:"image"`
					ImagePullPolicy string   `yaml:"imagePullPolicy"`
					Command         []string `yaml:"command"`
					SecurityContext struct {
						Privileged bool `yaml:"privileged"`
					} `yaml:"securityContext"`
					ReadinessProbe probe `yaml:"readinessProbe"`
					LivenessProbe  probe `yaml:"livenessProbe"`
					VolumeMounts   []struct {
						Name             string `yaml:"name"`
						MountPath        string `yaml:"mountPath"`
						MountPropagation string `yaml:"mountPropagation"`
					} `yaml:"volumeMounts"`
				} `yaml:"containers"`
				Volumes []struct {
					Name     string `yaml:"name"`
					HostPath *struct {
						Path string `yaml:"path"`
					} `yaml:"hostPath"`
					ConfigMap *struct {
						Name string `yaml:"name"`
					} `yaml:"configMap"`
				} `yaml:"volumes"`
			} `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type probe struct {
	Exec struct {
		Command []string `yaml:"command"`
	} `yaml:"exec"`
}

func readDaemonSet(t *testing.T) daemonSet {
	t.Helper()
	f, err := os.Open(filepath.Join(repoRoot(), "deploy", "kubernetes", "overclone-daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ds := daemonSet{mounts: map[string]string{}, propagate: map[string]string{}, hostPaths: map[string]string{}}
	dec := yaml.NewDecoder(f)
	for {
		var o k8sObject
		if err := dec.Decode(&o); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		switch o.Kind {
		case "ConfigMap":
			ds.cmName, ds.configToml = o.Metadata.Name, o.Data["config.toml"]
		case "DaemonSet":
			pod := o.Spec.Template.Spec
			if len(pod.Containers) != 1 {
				t.Fatalf("DaemonSet has %d containers, want 1", len(pod.Containers))
			}
			c := pod.Containers[0]
			ds.image, ds.pullPolicy, ds.command = c.Image, c.ImagePullPolicy, c.Command
			ds.privileged = c.SecurityContext.Privileged
			ds.readiness, ds.liveness = c.ReadinessProbe.Exec.Command, c.LivenessProbe.Exec.Command
			for _, m := range c.VolumeMounts {
				ds.mounts[m.Name] = m.MountPath
				ds.propagate[m.Name] = m.MountPropagation
			}
			for _, v := range pod.Volumes {
				switch {
				case v.HostPath != nil:
					ds.hostPaths[v.Name] = v.HostPath.Path
				case v.ConfigMap != nil:
					ds.configMap = v.ConfigMap.Name
				}
			}
		}
	}
	return ds
}

// TestDaemonSetManifest checks deploy/kubernetes/overclone-daemonset.yaml
// against the daemon's defaults and the image `make image` builds: the
// image name, the binaries' paths, the config, socket and root paths, the
// probes' socket, and the root and socket on the host at the same path as
// in the pod (the mounts overclone hands to containerd name root paths,
// which containerd resolves on the host).
func TestDaemonSetManifest(t *testing.T) {
	ds := readDaemonSet(t)
	if ds.image != nodeimage.DefaultName || ds.pullPolicy != "IfNotPresent" {
		t.Errorf("image %s (pull %q), want %s (IfNotPresent): make image builds that name and an operator imports it",
			ds.image, ds.pullPolicy, nodeimage.DefaultName)
	}
	daemon := path.Join(nodeimage.BinDir, nodeimage.Daemon)
	if len(ds.command) != 2 || ds.command[0] != daemon || ds.command[1] != "--config="+config.DefaultPath {
		t.Errorf("command %q, want %s --config=%s", ds.command, daemon, config.DefaultPath)
	}
	if !ds.privileged {
		t.Error("not privileged: overclone mounts overlays and writes trusted.* xattrs")
	}
	wantProbe := []string{path.Join(nodeimage.BinDir, nodeimage.CLI), "health", "--address=" + config.DefaultAddress}
	for name, p := range map[string][]string{"readiness": ds.readiness, "liveness": ds.liveness} {
		if strings.Join(p, " ") != strings.Join(wantProbe, " ") {
			t.Errorf("%s probe %q, want %q", name, p, wantProbe)
		}
	}
	// The size limits' loop mounts are made in the pod and must show on
	// the host; their loop devices are made after the pod started.
	if ds.propagate["root"] != "Bidirectional" {
		t.Errorf("root volume's mountPropagation %q, want Bidirectional", ds.propagate["root"])
	}
	for _, m := range []struct{ volume, dir string }{
		{"root", config.DefaultRoot},
		{"socket", path.Dir(config.DefaultAddress)},
		{"dev", "/dev"},
	} {
		if ds.mounts[m.volume] != m.dir || ds.hostPaths[m.volume] != m.dir {
			t.Errorf("volume %s: mounted at %q from host %q, want %s for both", m.volume, ds.mounts[m.volume], ds.hostPaths[m.volume], m.dir)
		}
	}
	if ds.mounts["config"] != path.Dir(config.DefaultPath) || ds.configMap != ds.cmName || ds.configToml == "" {
		t.Errorf("config volume at %q from ConfigMap %q (file defines %q with config.toml %q), want %s",
			ds.mounts["config"], ds.configMap, ds.cmName, ds.configToml, path.Dir(config.DefaultPath))
	}
	// The ConfigMap's config must load, and say what the probes and
	// mounts assume.
	cfgPath := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfgPath, []byte(ds.configToml), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath, false)
	if err != nil {
		t.Fatalf("the ConfigMap's config.toml: %v", err)
	}
	if cfg.Root != config.DefaultRoot || cfg.Address != config.DefaultAddress {
		t.Errorf("the ConfigMap's config has root %s, address %s; the mounts and probes assume %s, %s",
			cfg.Root, cfg.Address, config.DefaultRoot, config.DefaultAddress)
	}
}

var (
	nodeImageOnce    sync.Once
	nodeImageArchive string
	nodeImageErr     error
)

// nodeImage builds the DaemonSet's image once per test binary, as
// `make image` does.
func nodeImage(t *testing.T, f *fixture) string {
	t.Helper()
	nodeImageOnce.Do(func() {
		work := filepath.Join(f.dir, "nodeimage")
		nodeImageArchive = filepath.Join(f.dir, "overclone-image.tar")
		var res *nodeimage.Result
		res, nodeImageErr = nodeimage.Build(nodeimage.Options{RepoRoot: repoRoot(), Arch: runtime.GOARCH, Work: work}, nodeImageArchive)
		if nodeImageErr == nil {
			t.Logf("built %s %s, %d bytes", res.Name, res.Manifest.Digest, res.Size)
		}
	})
	if nodeImageErr != nil {
		t.Fatal(nodeImageErr)
	}
	return nodeImageArchive
}

// TestNodeImage runs the DaemonSet's image in a private containerd under
// the built-in overlayfs, the way the DaemonSet runs it (its command, its
// ConfigMap's config at its path, host dirs for socket and root,
// privileged), runs the DaemonSet's probes inside the container, and then
// uses the containerized overclone as the same containerd's proxy
// snapshotter: the test image is imported into it and run, and the view
// checked, and containers run with a size limit. Last, SIGTERM stops it
// cleanly, as the kubelet stops a pod. Each containerd runs it twice: on
// a root in the test's directory, where a limit is an ext4 image the
// daemon loop-mounts inside its container, and on a btrfs with qgroups
// enabled, where the daemon must find the quotas (in /sys/fs/btrfs, from
// inside its container) and make a limited snapshot a subvolume.
func TestNodeImage(t *testing.T) {
	for _, tc := range []struct{ name, binDir string }{
		{"containerd-1.6", harness.Containerd16Bin},
		{"containerd-2", harness.Containerd2BinDir()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, r := range []limitRoot{imageRoot, qgroupRoot} {
				t.Run(r.name, func(t *testing.T) { testNodeImage(t, tc.binDir, r) })
			}
		})
	}
}

func testNodeImage(t *testing.T, binDir string, r limitRoot) {
	f := getFixture(t)
	if m := harness.Missing(binDir, harness.ContainerdTools...); m != "" {
		require.Skipf(t, "containerd missing: %s (make containerd2 builds 2.x)", m)
	}
	archive := nodeImage(t, f)
	ds := readDaemonSet(t)
	// Made first, unmounted last: after the suite's close has stopped
	// the container and taken down the binds of it.
	mnt := r.mount(t)

	dir, err := harness.TempDir("oc-node-")
	if err != nil {
		t.Fatal(err)
	}
	// The proxy's socket and root are known before the daemon runs:
	// containerd dials a proxy only when it is first used.
	ocDir := filepath.Join(dir, "node")
	if mnt != "" {
		// The node's root is its btrfs: the host dir RunNodeContainer
		// binds into the container is this bind of it.
		if err := os.MkdirAll(filepath.Join(ocDir, "root"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount(mnt, filepath.Join(ocDir, "root"), "", unix.MS_BIND, ""); err != nil {
			t.Fatal(err)
		}
	}
	oc := &harness.Overclone{
		Root:   filepath.Join(ocDir, "root"),
		Socket: filepath.Join(ocDir, "run", path.Base(config.DefaultAddress)),
	}
	s := &suite{f: f, dir: dir, sns: []string{harness.SnapshotterName}, oc: oc,
		proxies: []harness.Proxy{{Name: harness.SnapshotterName, Overclone: oc}}}
	t.Cleanup(func() { s.close(t) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := os.Mkdir(filepath.Join(dir, "ctd"), 0o700); err != nil {
		t.Fatal(err)
	}
	if s.c, err = harness.StartContainerd(ctx, filepath.Join(dir, "ctd"),
		harness.ContainerdOptions{BinDir: binDir, Proxies: s.proxies}, t.Logf); err != nil {
		t.Fatal(err)
	}
	s.label = s.c.Version

	// The node's own image goes to the node's default snapshotter, as the
	// DaemonSet's comment asks: overclone cannot unpack itself.
	s.ctr(t, "images", "import", archive)
	node, err := harness.RunNodeContainer(ctx, s.c, ocDir, "overclone-node", harness.NodeSpec{
		Image:     ds.image,
		Command:   ds.command,
		Probes:    [][]string{ds.readiness, ds.liveness},
		SocketDir: ds.mounts["socket"],
		ConfigDir: ds.mounts["config"],
		Config:    ds.configToml,
		Root:      config.DefaultRoot,
		DevDir:    ds.mounts["dev"],
	})
	if err != nil {
		t.Fatal(err)
	}
	if node.Overclone.Socket != oc.Socket || node.Overclone.Root != oc.Root {
		t.Fatalf("container serves %s on %s, containerd dials %s for %s", node.Overclone.Root, node.Overclone.Socket, oc.Socket, oc.Root)
	}
	oc.Log = node.Overclone.Log // for close's tail on failure

	s.ctr(t, "images", "import", "--snapshotter", harness.SnapshotterName, f.archive)
	s.requireUnpacked(t, harness.SnapshotterName)
	s.runView(t, harness.SnapshotterName, imageName, "node-view", "")
	nodeLimit(ctx, t, s, r)
	s.ctr(t, "images", "rm", "--sync", imageName)
	if rows := s.snapshots(t, harness.SnapshotterName); len(rows) > 0 {
		t.Errorf("snapshots left in the containerized overclone: %v", rows)
	}
	if left := limitedDirs(t, oc.Root); len(left) > 0 {
		t.Errorf("limited snapshots left in the containerized overclone: %v", left)
	}
	if err := node.Stop(ctx); err != nil {
		t.Error(err)
	}
	if mnt != "" {
		// Stopped, the daemon has emptied its trash (Close waits).
		loopfs.NoQuotaLeft(t, mnt)
	}
}

// nodeLimit runs containers with a size limit on the containerized
// overclone: a write under the limit succeeds, one past it fails with r's
// error. On the image root that holds only if containerd, on the host,
// mounted the container's overlay on the image the daemon loop-mounted
// inside its own container: without the root's Bidirectional propagation
// the host sees the snapshot's bare directory and the write fills the
// host's disk instead; and the image ships mkfs.ext4, or the label would
// be refused. On btrfs with qgroups, EDQUOT says the daemon found the
// quotas from inside its container and made the snapshot a subvolume
// (with no quotas found it would have made an image: ENOSPC).
func nodeLimit(ctx context.Context, t *testing.T, s *suite, r limitRoot) {
	t.Helper()
	label := "--snapshotter-label=" + snapshots.LabelSnapshotMaxSize + "=" + strconv.Itoa(e2eLimit)
	sn := harness.SnapshotterName
	s.ctr(t, "run", "--rm", label, "--snapshotter", sn, imageName, "node-under", "/bin/viewer", "fill", "/under-the-limit", strconv.Itoa(e2eLimit/4))
	s.fillPastLimit(ctx, t, "node-past", []string{label, "--snapshotter", sn}, e2eFill, r.full)
	// The shim copies the container's output to the log file as it
	// comes; the daemon wrote this line before it served the probes.
	r.checkBackend(t, s.oc)
}
