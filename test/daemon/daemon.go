// Package daemon runs the real containerd-overclone-grpc binary for tests
// and connects to it the way containerd does: containerd's proxy
// snapshotter client over the unix socket.
package daemon

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// binDir holds the daemon binaries of test processes, one per process,
// named by its pid. A test process has no hook to run at its exit, so each
// build removes the binaries of processes that are gone instead: without
// it every `go test` run left a 22 MB binary behind.
var binDir = filepath.Join(os.TempDir(), "overclone-test-bin")

// Binary builds the daemon once per test process and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		if err := os.MkdirAll(binDir, 0o700); err != nil {
			buildErr = err
			return
		}
		removeDeadBinaries()
		binPath = filepath.Join(binDir, strconv.Itoa(os.Getpid()))
		_, file, _, _ := runtime.Caller(0)
		pkg := filepath.Join(filepath.Dir(file), "..", "..", "cmd", "containerd-overclone-grpc")
		cmd := exec.Command("go", "build", "-o", binPath, ".")
		cmd.Dir = pkg
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build daemon: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// removeDeadBinaries deletes the binaries of test processes that have
// exited (signal 0 to a pid that is gone fails with ESRCH).
func removeDeadBinaries() {
	entries, _ := os.ReadDir(binDir)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue
		}
		os.Remove(filepath.Join(binDir, e.Name()))
	}
}

// Daemon is one running containerd-overclone-grpc.
type Daemon struct {
	Root    string
	Address string
	Config  string // path of the config file it was started with
	Args    []string
	LogPath string

	t    testing.TB
	cmd  *exec.Cmd
	conn *grpc.ClientConn
	done chan error
}

// Start runs a daemon on root with a socket in a temporary directory and an
// optional TOML config text, logging at debug level for the test's
// failures to show. It is stopped when the test ends.
func Start(t testing.TB, root, configText string) *Daemon {
	t.Helper()
	return StartLogging(t, root, configText, "debug")
}

// StartLogging is Start at the given log level; "" is the daemon's own
// default, what ships, which is what a measurement must run.
func StartLogging(t testing.TB, root, configText, level string) *Daemon {
	t.Helper()
	dir := t.TempDir()
	d := &Daemon{
		Root:    root,
		Address: filepath.Join(dir, "run", "overclone.sock"),
		Config:  filepath.Join(dir, "config.toml"),
		LogPath: filepath.Join(dir, "daemon.log"),
		t:       t,
	}
	if err := os.WriteFile(d.Config, []byte(configText), 0o600); err != nil {
		t.Fatal(err)
	}
	d.Args = []string{"--root", d.Root, "--address", d.Address, "--config", d.Config}
	if level != "" {
		d.Args = append(d.Args, "--log-level", level)
	}
	if err := d.Restart(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d.cmd != nil {
			d.Stop()
		}
	})
	return d
}

// Restart starts the daemon process again (after Stop or Kill).
func (d *Daemon) Restart() error {
	logf, err := os.OpenFile(d.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(Binary(d.t), d.Args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	logf.Close()
	d.cmd = cmd
	d.done = make(chan error, 1)
	go func() { d.done <- cmd.Wait() }()
	if err := d.waitServing(10 * time.Second); err != nil {
		d.Kill()
		return fmt.Errorf("%w\ndaemon log:\n%s", err, d.Log())
	}
	return nil
}

// waitServing polls the health service until it answers SERVING.
func (d *Daemon) waitServing(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case err := <-d.done:
			return fmt.Errorf("daemon exited before serving: %v", err)
		default:
		}
		if _, err := os.Stat(d.Address); err == nil {
			conn, err := grpc.NewClient("unix://"+d.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				resp, herr := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
				cancel()
				if herr == nil && resp.Status == healthpb.HealthCheckResponse_SERVING {
					d.conn = conn
					return nil
				}
				conn.Close()
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon not serving on %s after %s", d.Address, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Client returns containerd's proxy snapshotter connected to the daemon.
func (d *Daemon) Client() snapshots.Snapshotter {
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(d.conn), "overclone")
}

// Conn is the daemon's gRPC connection.
func (d *Daemon) Conn() *grpc.ClientConn { return d.conn }

// Stop sends SIGTERM and waits for a clean exit.
func (d *Daemon) Stop() error {
	return d.signal(syscall.SIGTERM)
}

// Kill sends SIGKILL and waits for the process to go.
func (d *Daemon) Kill() error {
	return d.signal(syscall.SIGKILL)
}

func (d *Daemon) signal(sig syscall.Signal) error {
	if d.conn != nil {
		d.conn.Close()
		d.conn = nil
	}
	if d.cmd == nil {
		return nil
	}
	d.cmd.Process.Signal(sig)
	var err error
	select {
	case err = <-d.done:
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		err = fmt.Errorf("daemon did not exit 30s after %v", sig)
		<-d.done
	}
	d.cmd = nil
	if sig == syscall.SIGKILL {
		return nil
	}
	return err
}

// Log returns what the daemon wrote so far.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.LogPath)
	return string(b)
}

// Signal sends sig to the daemon without waiting: a test of what the
// daemon does between two signals, or a SIGKILL that must land while a
// call is in flight (Kill closes the connection first). Wait or Kill
// reaps the process afterwards.
func (d *Daemon) Signal(sig syscall.Signal) error {
	if d.cmd == nil {
		return fmt.Errorf("daemon not running")
	}
	return d.cmd.Process.Signal(sig)
}

// Wait waits up to timeout for the daemon to exit on its own (after
// Signal) and returns how it exited.
func (d *Daemon) Wait(timeout time.Duration) error {
	if d.cmd == nil {
		return nil
	}
	select {
	case err := <-d.done:
		d.cmd = nil
		if d.conn != nil {
			d.conn.Close()
			d.conn = nil
		}
		return err
	case <-time.After(timeout):
		return fmt.Errorf("daemon still running %s after the signal", timeout)
	}
}
