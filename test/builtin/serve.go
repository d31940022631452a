// The built-in served from a process of its own, configured as containerd
// ships it (Overlay), so that a test can compare overclone's daemon with a
// server of the same shape: its own process, its own scheduler and garbage
// collector, the same gRPC service and a unix socket. A built-in served
// from inside the test process would share the clients' CPU and look
// faster or slower for reasons that are not the snapshotter's.
//
// The server is the test binary itself, executed again: a test package
// calls ServeIfAsked first thing in its TestMain, and Start re-executes
// the binary with the environment that makes that call serve.

package builtin

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"google.golang.org/grpc"

	"github.com/overclone/overclone/snapshotter"
)

// Environment of the re-executed test binary: the root to serve and the
// socket to serve it on. Two variables, so that no path needs escaping.
const (
	RootEnv   = "OVERCLONE_SERVE_BUILTIN"
	SocketEnv = "OVERCLONE_SERVE_BUILTIN_SOCKET"
)

// ServeIfAsked serves the built-in and exits the process when the
// environment asks for it (Start set it); otherwise it returns at once.
func ServeIfAsked() {
	root, sock := os.Getenv(RootEnv), os.Getenv(SocketEnv)
	if root == "" {
		return
	}
	if err := Serve(root, sock); err != nil {
		fmt.Fprintln(os.Stderr, "serve the built-in:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// Serve serves the built-in at root on sock until SIGTERM or SIGINT, then
// lets the calls in flight finish and closes the metadata store. A program
// of its own (the bench) calls it directly.
func Serve(root, sock string) error {
	sn, err := Overlay(root)
	if err != nil {
		return err
	}
	defer sn.Close()
	l, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	// The service overclone's daemon serves with, so that both sides of a
	// comparison convert errors and stream Walk alike.
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotter.NewService(sn))
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		srv.GracefulStop()
	}()
	return srv.Serve(l)
}

// Server is one built-in running in a child process.
type Server struct {
	Root    string
	Address string
	LogPath string

	cmd  *exec.Cmd
	done chan error
}

// stopTimeout bounds a graceful stop before the child is killed.
const stopTimeout = 30 * time.Second

// Start serves the built-in on root from a child process, the test binary
// executed again, and waits until it listens. The test package's TestMain
// must call ServeIfAsked. The child is stopped when the test ends.
func Start(t testing.TB, root string) *Server {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s := &Server{
		Root:    root,
		Address: filepath.Join(dir, "builtin.sock"),
		LogPath: filepath.Join(dir, "builtin.log"),
		done:    make(chan error, 1),
	}
	logf, err := os.Create(s.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	// No arguments: the child runs no test, ServeIfAsked exits first.
	s.cmd = exec.Command(self)
	s.cmd.Env = append(os.Environ(), RootEnv+"="+root, SocketEnv+"="+s.Address)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() { s.Stop() })
	if err := s.waitListening(10 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, s.Log())
	}
	return s
}

func (s *Server) waitListening(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case err := <-s.done:
			s.cmd = nil
			return fmt.Errorf("the built-in exited before serving: %v", err)
		default:
		}
		if c, err := net.Dial("unix", s.Address); err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the built-in is not listening on %s after %v", s.Address, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Signal sends sig to the child without waiting (SIGQUIT: the Go runtime
// writes every goroutine's stack to the log).
func (s *Server) Signal(sig syscall.Signal) error {
	if s.cmd == nil {
		return fmt.Errorf("the built-in is not running")
	}
	return s.cmd.Process.Signal(sig)
}

// Stop sends SIGTERM and waits for a clean exit; past stopTimeout the
// child is killed and the error says so.
func (s *Server) Stop() error {
	if s.cmd == nil {
		return nil
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	var err error
	select {
	case err = <-s.done:
	case <-time.After(stopTimeout):
		s.cmd.Process.Kill()
		<-s.done
		err = fmt.Errorf("the built-in did not exit %v after SIGTERM", stopTimeout)
	}
	s.cmd = nil
	return err
}

// Log returns what the child wrote so far.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.LogPath)
	return string(b)
}
