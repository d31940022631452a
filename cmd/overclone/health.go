package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// runHealth asks the daemon's standard gRPC health service whether it
// serves: a Kubernetes readiness probe or a script that must wait for the
// socket before restarting containerd runs it.
func runHealth(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("health", flag.ContinueOnError)
	fs.SetOutput(stderr)
	d := addDaemonFlags(fs)
	if code, ok := parseFlags(fs, args, 0, ""); !ok {
		return code
	}
	conn, err := d.conn()
	if err != nil {
		fmt.Fprintf(stderr, "overclone health: %v\n", err)
		return exitFail
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, *d.timeout)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		fmt.Fprintf(stderr, "overclone health: %s: %v\n", *d.address, err)
		return exitFail
	}
	fmt.Fprintln(stdout, resp.Status)
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return exitFail
	}
	return exitOK
}

// daemonAnswers reports whether a daemon serves on the socket.
func daemonAnswers(ctx context.Context, d daemonFlags) bool {
	conn, err := d.conn()
	if err != nil {
		return false
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err == nil
}
