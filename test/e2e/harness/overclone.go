package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Overclone is a containerd-overclone-grpc daemon on its own root and socket.
type Overclone struct {
	Bin    string // containerd-overclone-grpc
	Root   string
	Socket string
	Config string
	Log    string

	logf Logf
	proc *process
}

// NewOverclone lays out an overclone daemon under dir without starting it.
func NewOverclone(bin, dir string, logf Logf) (*Overclone, error) {
	o := &Overclone{
		Bin:    bin,
		Root:   filepath.Join(dir, "root"),
		Socket: filepath.Join(dir, "overclone.sock"),
		Config: filepath.Join(dir, "config.toml"),
		Log:    filepath.Join(dir, "overclone.log"),
		logf:   logf,
	}
	// An explicit, empty config: the daemon's defaults, but never the
	// host's /etc/containerd-overclone/config.toml.
	if err := os.WriteFile(o.Config, []byte("# defaults\n"), 0o644); err != nil {
		return nil, err
	}
	return o, nil
}

// Start starts the daemon and waits until it answers gRPC health checks.
func (o *Overclone) Start(ctx context.Context) error {
	if o.proc != nil && o.proc.running() {
		return fmt.Errorf("overclone already running")
	}
	p, err := startProcess("containerd-overclone-grpc", o.Log, os.Environ(), o.Bin,
		"--address", o.Socket, "--root", o.Root, "--config", o.Config, "--log-level", "debug")
	if err != nil {
		return err
	}
	o.proc = p
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	start := time.Now()
	err = waitFor(ctx, p, "overclone health", func() error {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		return Health(cctx, o.Socket)
	})
	if err != nil {
		_ = p.stop()
		return err
	}
	o.logf("overclone up on %s in %s (pid %d)", o.Socket, time.Since(start).Round(time.Millisecond), p.cmd.Process.Pid)
	return nil
}

// Stop sends SIGTERM and waits for a clean exit.
func (o *Overclone) Stop() error {
	if o.proc == nil {
		return nil
	}
	return o.proc.stop()
}

// Running reports whether the daemon process is alive.
func (o *Overclone) Running() bool { return o.proc != nil && o.proc.running() }

// Tail returns the end of the daemon's log.
func (o *Overclone) Tail(n int) string { return tailFile(o.Log, n) }
