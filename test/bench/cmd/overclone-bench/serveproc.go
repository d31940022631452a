package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/overclone/overclone/test/builtin"
)

// serveBuiltin is this program run as `-serve-builtin ROOT -socket SOCK`:
// containerd's built-in overlayfs snapshotter, with its plugin's defaults,
// served by the same gRPC service as overclone, in a process of its own, so that the real daemon
// is compared with a process of the same shape, not with a server that
// shares the client's process (and its scheduler).
func serveBuiltin(root, sock string) error {
	return builtin.Serve(root, sock)
}

// startBuiltinProc starts serveBuiltin in a child process and returns
// containerd's proxy client for it, and a function that stops it.
func startBuiltinProc(root, dir string) (snapshots.Snapshotter, func(), error) {
	self, err := os.Executable()
	if err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(dir, "builtin.sock")
	cmd := exec.Command(self, "-serve-builtin", root, "-socket", sock)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	stop := func() {
		cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			stop()
			return nil, nil, fmt.Errorf("built-in server not listening on %s", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "builtin")
	// The first call sets up the connection; keep it out of the samples.
	sn.Walk(context.Background(), func(context.Context, snapshots.Info) error { return nil })
	return sn, func() { conn.Close(); stop() }, nil
}
