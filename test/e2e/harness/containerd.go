package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// ContainerdOptions choose the containerd binaries and what its generated
// config says about overclone.
type ContainerdOptions struct {
	BinDir string // holds containerd, ctr, containerd-shim-runc-v2
	// Proxies become [proxy_plugins] entries (and, on 2.x, unpack_config
	// entries).
	Proxies []Proxy
	// Capabilities and MaxConcurrentUnpacks: see containerdConfig.
	Capabilities         []string
	MaxConcurrentUnpacks int
	// LogLevel defaults to info; debug shows how each image was unpacked.
	LogLevel string
	// CRI, when set, keeps the CRI plugins on with these settings.
	CRI *CRI
	// LinkImageFS makes <containerd root>/io.containerd.snapshotter.v1.<name>
	// a symlink to each proxy's root before containerd starts: the path
	// containerd 1.6's CRI reports to the kubelet as the image filesystem
	// (1.6 ignores exports), made true as deploy/README.md tells 1.6
	// users to.
	LinkImageFS bool
	// Snippet, when set, replaces the generated config: a deploy/containerd
	// file, run as it is except for this daemon's own root, state and
	// socket, and overclone's socket and root instead of the default paths.
	// A snippet of only its version line is the same node before anything
	// of overclone's was merged in (no Proxies then).
	Snippet string
	// Extra is a deploy/containerd snippet merged into the config after
	// everything else (its version line dropped, overclone's default
	// socket replaced by the first proxy's): tables the generated
	// config does not have, such as the diff proxy plugin.
	Extra string
}

// Proxy is one overclone daemon as a containerd proxy snapshotter.
type Proxy struct {
	Name      string // the snapshotter name containerd knows it by
	Overclone *Overclone
}

// Containerd is a private containerd daemon: own root, state, socket and
// config, nothing shared with a containerd the host may run.
type Containerd struct {
	Opts    ContainerdOptions
	Dir     string
	Root    string // containerd's root dir
	Address string
	Config  string
	Log     string
	Version string // as `containerd --version` reports it, e.g. "1.6.20" or "2.4.2"
	Major   int

	env  []string
	logf Logf
	proc *process
}

var versionRE = regexp.MustCompile(`\bv?(\d+)\.(\d+)\.(\d+)`)

// StartContainerd writes the config under dir and starts containerd.
func StartContainerd(ctx context.Context, dir string, opts ContainerdOptions, logf Logf) (*Containerd, error) {
	c := &Containerd{
		Opts:    opts,
		Dir:     dir,
		Root:    filepath.Join(dir, "root"),
		Address: filepath.Join(dir, "containerd.sock"),
		Config:  filepath.Join(dir, "config.toml"),
		Log:     filepath.Join(dir, "containerd.log"),
		logf:    logf,
		// The shim and runc are looked up in PATH: the shim next to this
		// containerd first, runc from Debian.
		env: append(os.Environ(), "PATH="+opts.BinDir+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
	}
	out, err := run(ctx, c.env, filepath.Join(opts.BinDir, "containerd"), "--version")
	if err != nil {
		return nil, err
	}
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return nil, fmt.Errorf("containerd --version: cannot parse %q", out)
	}
	c.Version = m[1] + "." + m[2] + "." + m[3]
	c.Major, _ = strconv.Atoi(m[1])
	if err := c.writeConfig(); err != nil {
		return nil, err
	}
	if err := c.start(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Restart is a node's `systemctl restart containerd` after a config change:
// SIGTERM, which leaves every task running in its shim, then containerd
// again on the same root, state and socket with the config opts give
// (BinDir stays). Unlike Stop it removes no task or container first.
func (c *Containerd) Restart(ctx context.Context, opts ContainerdOptions) error {
	if c.proc == nil {
		return fmt.Errorf("containerd %s was never started", c.Version)
	}
	if err := c.proc.stop(); err != nil {
		return err
	}
	opts.BinDir = c.Opts.BinDir
	c.Opts = opts
	if err := c.writeConfig(); err != nil {
		return err
	}
	return c.start(ctx)
}

// writeConfig writes the config c.Opts describe, and the image filesystem
// links they ask for.
func (c *Containerd) writeConfig() error {
	opts := c.Opts
	cfg := containerdConfig{
		Root:                 c.Root,
		CRI:                  opts.CRI != nil,
		State:                filepath.Join(c.Dir, "state"),
		Address:              c.Address,
		Capabilities:         opts.Capabilities,
		MaxConcurrentUnpacks: opts.MaxConcurrentUnpacks,
	}
	cfg.Proxies = opts.Proxies
	text, err := cfg.render(c.Major)
	if opts.Snippet != "" {
		text, err = cfg.fromSnippet(opts.Snippet)
	}
	if err != nil {
		return err
	}
	if opts.CRI != nil {
		text = mergeTables(text, opts.CRI.tables(c.Major))
	}
	if opts.Extra != "" {
		text += "\n" + extraTables(opts.Extra, opts.Proxies)
	}
	if opts.LinkImageFS {
		if err := os.MkdirAll(c.Root, 0o700); err != nil {
			return err
		}
		for _, p := range opts.Proxies {
			link := ImageFSLink(c.Root, p.Name)
			// A restart on the same root finds the link made before.
			if target, err := os.Readlink(link); err == nil && target == p.Overclone.Root {
				continue
			}
			if err := os.Symlink(p.Overclone.Root, link); err != nil {
				return err
			}
		}
	}
	return os.WriteFile(c.Config, []byte(text), 0o644)
}

// start starts containerd on c.Config and waits until it answers.
func (c *Containerd) start(ctx context.Context) error {
	level := c.Opts.LogLevel
	if level == "" {
		level = "info"
	}
	p, err := startProcess("containerd "+c.Version, c.Log, c.env, filepath.Join(c.Opts.BinDir, "containerd"),
		"--config", c.Config, "--log-level", level)
	if err != nil {
		return err
	}
	c.proc = p
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	start := time.Now()
	err = waitFor(wctx, p, "containerd "+c.Version+" ready", func() error {
		_, err := c.Ctr(wctx, "version")
		return err
	})
	if err != nil {
		_ = p.stop()
		return err
	}
	c.logf("containerd %s up on %s in %s", c.Version, c.Address, time.Since(start).Round(time.Millisecond))
	return nil
}

// Ctr runs this containerd's ctr against it in the test namespace.
func (c *Containerd) Ctr(ctx context.Context, args ...string) (string, error) {
	return run(ctx, c.env, filepath.Join(c.Opts.BinDir, "ctr"),
		append([]string{"--address", c.Address, "--namespace", Namespace}, args...)...)
}

// Running reports whether containerd is alive.
func (c *Containerd) Running() bool { return c.proc != nil && c.proc.running() }

// Tail returns the end of containerd's log.
func (c *Containerd) Tail(n int) string { return tailFile(c.Log, n) }

// Stop kills and removes every task and container containerd still has (a
// failed test leaves them behind, and their shims outlive containerd), then
// stops containerd and unmounts whatever is left under its dir.
func (c *Containerd) Stop() error {
	if c.proc == nil {
		return nil
	}
	var errs []string
	if c.proc.running() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		if err := c.removeAll(ctx); err != nil {
			errs = append(errs, err.Error())
		}
		cancel()
	}
	if err := c.proc.stop(); err != nil {
		errs = append(errs, err.Error())
	}
	if err := UnmountUnder(c.Dir); err != nil {
		errs = append(errs, err.Error())
	}
	removeNamespaceCgroups()
	if len(errs) > 0 {
		return fmt.Errorf("stop containerd %s: %s", c.Version, strings.Join(errs, "; "))
	}
	return nil
}

func (c *Containerd) removeAll(ctx context.Context) error {
	out, err := c.Ctr(ctx, "tasks", "ls", "-q")
	if err != nil {
		return err
	}
	for _, id := range strings.Fields(out) {
		c.logf("cleanup: killing task %s", id)
		_, _ = c.Ctr(ctx, "tasks", "kill", "-s", "SIGKILL", id)
		for i := 0; i < 100; i++ {
			if _, err := c.Ctr(ctx, "tasks", "rm", "-f", id); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	out, err = c.Ctr(ctx, "containers", "ls", "-q")
	if err != nil {
		return err
	}
	for _, id := range strings.Fields(out) {
		if _, err := c.Ctr(ctx, "containers", "rm", id); err != nil {
			return err
		}
	}
	return nil
}

// removeNamespaceCgroups removes the per-namespace parent cgroups runc
// made (/sys/fs/cgroup/<controller>/overclone-e2e on cgroup v1, one dir on
// v2) once they are empty; a cgroup still in use by another run refuses.
func removeNamespaceCgroups() {
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", Namespace))
	dirs = append(dirs, filepath.Join("/sys/fs/cgroup", Namespace))
	for _, d := range dirs {
		_ = os.Remove(d)
	}
}
