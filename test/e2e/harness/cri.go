package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// CRI turns on containerd's CRI plugin for a private containerd, set up as
// a kubelet's node would be but with nothing fetched from the internet.
type CRI struct {
	// SandboxImage is the pause image CRI starts every pod with; the test
	// imports it into the k8s.io namespace, so CRI never pulls it.
	SandboxImage string
	// HostsDir is CRI's registry config_path: one dir per registry host
	// holding a hosts.toml (see WriteRegistryHosts).
	HostsDir string
	// RuncBinary, when set, is the runc CRI's runc runtime runs (2.x):
	// user-namespaced pods need runc 1.2 or later.
	RuncBinary string
}

// CRINamespace is the containerd namespace CRI keeps its images,
// containers and sandboxes in.
const CRINamespace = "k8s.io"

// criStatsPeriod is how often, in seconds, CRI asks the snapshotter for the
// usage of every snapshot (default 10): the tests read a write's size back
// from `crictl stats` without waiting ten seconds for each.
const criStatsPeriod = 1

// criTables are the CRI settings the tests add to a config, by table:
//   - the sandbox image, named by the tests;
//   - restrict_oom_score_adj: this VM's root lacks CAP_SYS_RESOURCE, and
//     runc cannot give a sandbox the -998 CRI asks for (NOTES.md);
//   - the registry hosts dir, where the local registry is plain http;
//   - the snapshot usage period (criStatsPeriod).
//
// CRI's root and state stay its plugin dirs under containerd's own, and no
// CNI config is given: the tests run host-network pods only, and CRI starts
// without one (it logs that the network is not ready).
func (c CRI) tables(major int) []tomlTable {
	q := funcs["q"].(func(string) string)
	period := fmt.Sprintf("stats_collect_period = %d", criStatsPeriod)
	if major < 2 {
		return []tomlTable{
			{`plugins."io.containerd.grpc.v1.cri"`, []string{
				"sandbox_image = " + q(c.SandboxImage),
				"restrict_oom_score_adj = true",
				period,
			}},
			{`plugins."io.containerd.grpc.v1.cri".registry`, []string{"config_path = " + q(c.HostsDir)}},
		}
	}
	tables := []tomlTable{
		{`plugins.'io.containerd.cri.v1.images'`, []string{period}},
		{`plugins.'io.containerd.cri.v1.images'.pinned_images`, []string{"sandbox = " + q(c.SandboxImage)}},
		{`plugins.'io.containerd.cri.v1.images'.registry`, []string{"config_path = " + q(c.HostsDir)}},
		{`plugins.'io.containerd.cri.v1.runtime'`, []string{"restrict_oom_score_adj = true"}},
	}
	if c.RuncBinary != "" {
		tables = append(tables, tomlTable{`plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options`, []string{"BinaryName = " + q(c.RuncBinary)}})
	}
	return tables
}

// tomlTable is a table header (without brackets) and key lines.
type tomlTable struct {
	name string
	keys []string
}

// mergeTables adds the tables' keys to a config: into the table where the
// config already has its header (TOML forbids a second [x] for the same x,
// and the deploy snippets define some of CRI's tables), at the end
// otherwise. Headers are matched as written, so the tables must be spelled
// as the deploy snippets spell them.
func mergeTables(config string, tables []tomlTable) string {
	lines := strings.Split(config, "\n")
	var tail []string
	for _, t := range tables {
		header := "[" + t.name + "]"
		at := -1
		for i, l := range lines {
			if strings.TrimSpace(l) == header {
				at = i
				break
			}
		}
		keys := make([]string, len(t.keys))
		for i, k := range t.keys {
			keys[i] = "  " + k
		}
		if at < 0 {
			tail = append(append(append(tail, ""), header), keys...)
			continue
		}
		lines = append(lines[:at+1], append(keys, lines[at+1:]...)...)
	}
	return strings.Join(append([]string{strings.Join(lines, "\n"), "# Set by overclone's e2e harness for CRI."}, tail...), "\n") + "\n"
}

// WriteRegistryHosts writes the hosts.toml CRI's config_path reads for
// host (host:port): a plain-HTTP registry that serves pulls.
func WriteRegistryHosts(dir, host string) error {
	d := filepath.Join(dir, host)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	text := fmt.Sprintf(`server = "http://%s"

[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, host, host)
	return os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(text), 0o644)
}

// CtrIn runs ctr against this containerd in namespace ns (CRI's is
// k8s.io).
func (c *Containerd) CtrIn(ctx context.Context, ns string, args ...string) (string, error) {
	return run(ctx, c.env, filepath.Join(c.Opts.BinDir, "ctr"),
		append([]string{"--address", c.Address, "--namespace", ns}, args...)...)
}

// Crictl is crictl pointed at one containerd's CRI socket.
type Crictl struct {
	Bin    string
	Config string // crictl.yaml naming the endpoints
}

// CrictlBin is where `make crictl` caches crictl; OVERCLONE_CRICTL_BIN
// overrides the dir.
const CrictlBin = "/var/cache/overclone/crictl-v1.37.0/bin"

// CrictlBinDir returns the crictl dir to use.
func CrictlBinDir() string {
	if d := os.Getenv("OVERCLONE_CRICTL_BIN"); d != "" {
		return d
	}
	return CrictlBin
}

// NewCrictl writes a crictl.yaml under dir for containerd c: an explicit
// config, so that neither the host's /etc/crictl.yaml nor crictl's probing
// of default sockets reaches another runtime.
func NewCrictl(binDir, dir string, c *Containerd) (*Crictl, error) {
	cfg := filepath.Join(dir, "crictl.yaml")
	text := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n", c.Address, c.Address)
	if err := os.WriteFile(cfg, []byte(text), 0o644); err != nil {
		return nil, err
	}
	return &Crictl{Bin: filepath.Join(binDir, "crictl"), Config: cfg}, nil
}

// Run runs crictl and returns its stdout.
func (c *Crictl) Run(ctx context.Context, args ...string) (string, error) {
	return run(ctx, os.Environ(), c.Bin, append([]string{"--config", c.Config}, args...)...)
}

// ImageFSLink is the path containerd 1.6's CRI reports as the image
// filesystem of snapshotter name: 1.6 ignores a proxy plugin's exports and
// names its own plugin dir for the snapshotter, which no proxy creates.
func ImageFSLink(containerdRoot, name string) string {
	return filepath.Join(containerdRoot, "io.containerd.snapshotter.v1."+name)
}
