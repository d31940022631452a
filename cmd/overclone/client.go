package main

import (
	"context"
	"flag"
	"fmt"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// defaultAddress is the daemon's socket, as in its config.
const defaultAddress = "/run/containerd-overclone/containerd-overclone-grpc.sock"

// defaultNamespace is where containerd keeps images unless told otherwise.
// The daemon sees keys with containerd's namespace and sequence prefix
// ("default/12/sha256:..."); the CLI passes keys as the daemon sees them,
// so the namespace only labels the call.
const defaultNamespace = "default"

// daemonFlags are the flags of every subcommand that talks to the daemon:
// the admin tool never opens the metadata database itself (the daemon
// holds its lock), so whatever it does goes through the daemon's socket.
type daemonFlags struct {
	address *string
	timeout *time.Duration
}

func addDaemonFlags(fs *flag.FlagSet) daemonFlags {
	return daemonFlags{
		address: fs.String("address", defaultAddress, "the daemon's socket"),
		timeout: fs.Duration("timeout", 5*time.Minute, "give up after this long"),
	}
}

// connect dials the daemon and returns containerd's proxy snapshotter
// client on it, as containerd itself talks to overclone.
func (d daemonFlags) connect(ctx context.Context) (context.Context, snapshots.Snapshotter, func(), error) {
	conn, err := grpc.NewClient("unix://"+*d.address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("connect to %s: %w", *d.address, err)
	}
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, defaultNamespace), *d.timeout)
	done := func() {
		cancel()
		conn.Close()
	}
	return ctx, proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "overclone"), done, nil
}

// conn dials the daemon for a raw gRPC client.
func (d daemonFlags) conn() (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+*d.address, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

// parseFlags parses a subcommand's flags and checks the argument count.
func parseFlags(fs *flag.FlagSet, args []string, nargs int, argsHelp string) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return exitOK, false
		}
		return exitUsage, false
	}
	if fs.NArg() != nargs {
		fmt.Fprintf(fs.Output(), "usage: overclone %s [flags] %s\n", fs.Name(), argsHelp)
		return exitUsage, false
	}
	return 0, true
}
