// Package harness starts and stops what the end-to-end tests and `make demo`
// drive: the overclone daemon, a private containerd (1.6 from Debian or a 2.x
// build) pointed at it, and a local registry. Everything it starts lives in
// one directory and is stopped, unmounted and removed by Close, also after a
// failure half way.
//
// It only runs real binaries (containerd, ctr, runc, docker-registry); it
// never fakes containerd's side of the snapshotter contract.
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Logf reports progress; testing.T.Logf and log.Printf both fit.
type Logf func(format string, args ...any)

// Defaults shared by the tests, the demo and the README.
const (
	// Containerd16Bin is where Debian's containerd package puts containerd,
	// ctr and containerd-shim-runc-v2.
	Containerd16Bin = "/usr/bin"
	// Containerd2Bin is where `make containerd2` caches the containerd 2.x
	// build; OVERCLONE_CONTAINERD2_BIN overrides it.
	Containerd2Bin = "/var/cache/overclone/containerd-v2.4.2/bin"
	// Namespace is the containerd namespace every test works in.
	Namespace = "overclone-e2e"
	// SnapshotterName is the proxy plugin's name in the generated configs.
	SnapshotterName = "overclone"
	// UserspaceName is a second overclone daemon with mode = "userspace"
	// (complete snapshot dirs, bind mounts), next to the first in auto
	// mode, so both modes meet containerd in the same run.
	UserspaceName = "overclone-userspace"
	// stopTimeout bounds a graceful SIGTERM stop before SIGKILL.
	stopTimeout = 20 * time.Second
)

// Containerd2BinDir returns the containerd 2.x binary dir to use.
func Containerd2BinDir() string {
	if d := os.Getenv("OVERCLONE_CONTAINERD2_BIN"); d != "" {
		return d
	}
	return Containerd2Bin
}

// RuncBin is where `make runc` caches runc >= 1.2, which user-namespaced
// containers need (Debian's is 1.1.5); OVERCLONE_RUNC_BIN overrides the dir.
const RuncBin = "/var/cache/overclone/runc-v1.5.3/bin"

// RuncBinDir returns the dir of the runc to use for user namespaces.
func RuncBinDir() string {
	if d := os.Getenv("OVERCLONE_RUNC_BIN"); d != "" {
		return d
	}
	return RuncBin
}

// Missing returns the first of the named binaries that dir lacks, or "".
func Missing(dir string, names ...string) string {
	for _, n := range names {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			return filepath.Join(dir, n)
		}
	}
	return ""
}

// ContainerdTools are the binaries a containerd bin dir must hold.
var ContainerdTools = []string{"containerd", "ctr", "containerd-shim-runc-v2"}

// TempDir makes a short directory under /tmp: unix socket paths inside it
// must stay below the 108-byte sun_path limit, which t.TempDir's long names
// break.
func TempDir(prefix string) (string, error) {
	return os.MkdirTemp("/tmp", prefix)
}

// process is one daemon the harness started.
type process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	log  string
}

func startProcess(name, logPath string, env []string, bin string, args ...string) (*process, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = env
	// Own process group: a ^C to `make demo` reaches the harness, which
	// then stops its daemons in order instead of having them die at once.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *process) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM, waits, and kills after stopTimeout. It returns the
// exit error of a process that did not exit cleanly on SIGTERM.
func (p *process) stop() error {
	if !p.running() {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		var exitErr *exec.ExitError
		if errors.As(p.err, &exitErr) {
			return fmt.Errorf("%s exited after SIGTERM: %w", p.name, p.err)
		}
		return nil
	case <-time.After(stopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not stop within %s of SIGTERM; killed", p.name, stopTimeout)
	}
}

// tail returns the last n lines of the process log, for error messages.
func (p *process) tail(n int) string {
	return tailFile(p.log, n)
}

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitFor polls check every 50 ms until it returns nil, ctx ends or the
// process exits.
func waitFor(ctx context.Context, p *process, what string, check func() error) error {
	var last error
	for {
		if last = check(); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last: %v)\n%s", what, ctx.Err(), last, p.tail(20))
		case <-p.done:
			return fmt.Errorf("%s: %s exited: %v\n%s", what, p.name, p.err, p.tail(20))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// run executes a command and returns its stdout; errors carry stderr.
func run(ctx context.Context, env []string, bin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
