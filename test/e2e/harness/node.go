package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// NodeContainer is overclone run from the DaemonSet's image as a container
// of a private containerd, the way the DaemonSet runs it on a node:
// privileged, the DaemonSet's command, its ConfigMap's config mounted where
// the DaemonSet mounts it, and host dirs bound for the socket and the root.
type NodeContainer struct {
	ID string
	// Overclone names the daemon's host-side socket and root, for a
	// Proxy of a containerd (this one or another); it has no process
	// of its own: Start and Stop act on the container.
	Overclone *Overclone

	c *Containerd
}

// NodeSpec is what the DaemonSet says about the container: the image, its
// command, its probes, and where it mounts what.
type NodeSpec struct {
	Image     string
	Command   []string
	Probes    [][]string // exec probe commands, run inside the container
	SocketDir string     // in the container; a host dir is bound there
	ConfigDir string     // in the container; the config file is bound there read-only
	Config    string     // the ConfigMap's config.toml
	Root      string     // the config's root, which the test swaps for a host dir
	DevDir    string     // where the host's /dev is bound, if the DaemonSet binds it
}

// RunNodeContainer lays out the host side under dir (socket dir, root,
// config), starts the container id from spec.Image (already imported into
// c) and waits until every probe succeeds inside it.
//
// The root is bound at the same path inside as outside, as the DaemonSet's
// hostPath is: the mounts overclone hands to containerd name paths under
// it, and containerd mounts them on the host. So spec.Root in the config
// becomes a private host dir, the one change to the shipped config. The
// socket dir can differ (only its file is dialed), so it stays where the
// DaemonSet has it and a host dir of the test's is bound there.
//
// The root's bind is what the DaemonSet's mountPropagation: Bidirectional
// asks of a runtime (containerd's CRI does the same): recursive and shared
// ("rbind:rshared", with the container's rootfs propagation rshared, or
// runc would make it a slave that cannot send), from a host mount that is
// shared, which the host dir is made here (a bind on itself, marked
// shared; CRI refuses a Bidirectional mount whose host path is not on a
// shared mount). The size limits' loop mounts the daemon makes inside the
// container then show on the host, where containerd mounts overlays on
// them.
func RunNodeContainer(ctx context.Context, c *Containerd, dir, id string, spec NodeSpec) (*NodeContainer, error) {
	hostSock, root, hostCfg := filepath.Join(dir, "run"), filepath.Join(dir, "root"), filepath.Join(dir, "etc")
	for _, d := range []string{hostSock, root, hostCfg} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	if !strings.Contains(spec.Config, spec.Root) {
		return nil, fmt.Errorf("the config does not name root %s:\n%s", spec.Root, spec.Config)
	}
	if err := unix.Mount(root, root, "", unix.MS_BIND, ""); err != nil {
		return nil, fmt.Errorf("bind %s on itself: %w", root, err)
	}
	if err := unix.Mount("", root, "", unix.MS_SHARED, ""); err != nil {
		return nil, fmt.Errorf("make %s shared: %w", root, err)
	}
	cfg := strings.ReplaceAll(spec.Config, "'"+spec.Root+"'", "'"+root+"'")
	if err := os.WriteFile(filepath.Join(hostCfg, "config.toml"), []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	n := &NodeContainer{
		ID: id,
		Overclone: &Overclone{
			Root:   root,
			Socket: filepath.Join(hostSock, "containerd-overclone-grpc.sock"),
			Config: filepath.Join(hostCfg, "config.toml"),
			Log:    filepath.Join(dir, "overclone.log"),
			logf:   c.logf,
		},
		c: c,
	}
	bind := func(src, dst, mode string) string {
		return "type=bind,src=" + src + ",dst=" + dst + ",options=rbind:" + mode
	}
	args := []string{"run", "-d", "--privileged", "--log-uri", "file://" + n.Overclone.Log,
		"--rootfs-propagation", "rshared",
		"--mount", bind(hostSock, spec.SocketDir, "rw"),
		"--mount", bind(root, root, "rw:rshared"),
		"--mount", bind(hostCfg, spec.ConfigDir, "ro")}
	if spec.DevDir != "" {
		args = append(args, "--mount", bind("/dev", spec.DevDir, "rw"))
	}
	args = append(args, spec.Image, id)
	start := time.Now()
	if _, err := c.Ctr(ctx, append(args, spec.Command...)...); err != nil {
		return nil, err
	}
	// The kubelet would run the readiness probe until it passes; so
	// does this, then each probe once more, all inside the container.
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for i := 0; ; i++ {
		err := n.Exec(wctx, fmt.Sprintf("probe-%d", i), spec.Probes[0]...)
		if err == nil {
			break
		}
		select {
		case <-wctx.Done():
			return n, fmt.Errorf("readiness probe in %s: %w\n%s", id, err, n.Overclone.Tail(20))
		case <-time.After(200 * time.Millisecond):
		}
	}
	for i, p := range spec.Probes {
		if err := n.Exec(ctx, fmt.Sprintf("probe-again-%d", i), p...); err != nil {
			return n, fmt.Errorf("probe %v in %s: %w", p, id, err)
		}
	}
	c.logf("overclone in container %s (%s) ready on %s in %s", id, spec.Image, n.Overclone.Socket, time.Since(start).Round(time.Millisecond))
	return n, nil
}

// Exec runs args inside the container, as a Kubernetes exec probe does.
func (n *NodeContainer) Exec(ctx context.Context, execID string, args ...string) error {
	_, err := n.c.Ctr(ctx, append([]string{"tasks", "exec", "--exec-id", execID, n.ID}, args...)...)
	return err
}

// Stop sends SIGTERM, as the kubelet does, waits for the task to exit and
// removes task and container. It fails if the daemon exited with an error.
func (n *NodeContainer) Stop(ctx context.Context) error {
	if _, err := n.c.Ctr(ctx, "tasks", "kill", "-s", "SIGTERM", n.ID); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	for {
		out, err := n.c.Ctr(ctx, "tasks", "ls")
		if err != nil {
			return err
		}
		if taskStatus(out, n.ID) == "STOPPED" {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("container %s still running after SIGTERM: %w", n.ID, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	// ctr exits with the task's exit status here.
	if _, err := n.c.Ctr(ctx, "tasks", "rm", n.ID); err != nil {
		return fmt.Errorf("overclone's exit: %w\n%s", err, n.Overclone.Tail(20))
	}
	// The exit status, which tasks rm checked, is what says the stop
	// was clean (the daemon exits 1 when it has to cut calls off). Its
	// last log lines are no proof either way: containerd's file logger
	// copies the output asynchronously and may not have written them
	// when the task is gone (seen once in ten runs).
	if _, err := n.c.Ctr(ctx, "containers", "rm", n.ID); err != nil {
		return err
	}
	return nil
}

func taskStatus(ls, id string) string {
	for _, line := range strings.Split(ls, "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == id {
			return f[2]
		}
	}
	return ""
}
