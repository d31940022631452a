package main

import (
	"context"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// stuckHealth is a handler that never returns, whatever its context says:
// a call blocked in a write on a hung disk.
type stuckHealth struct {
	healthpb.UnimplementedHealthServer
	entered chan struct{}
	release chan struct{}
}

func (h stuckHealth) Check(context.Context, *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	close(h.entered)
	<-h.release
	return &healthpb.HealthCheckResponse{}, nil
}

// TestStopServingBoundedByStuckCall: a call that never returns does not
// hold the stop past the cut-off (the timeout, or a second signal) plus
// stopGrace, and the shared work is aborted at the cut-off. A second signal
// right after the first makes grpc's Stop race its GracefulStop, where
// Stop was seen to wait for the handler now and then: many servers stop at
// once to catch it.
func TestStopServingBoundedByStuckCall(t *testing.T) {
	const timeout = 200 * time.Millisecond
	for _, tc := range []struct {
		name    string
		second  bool
		servers int
		cutoff  time.Duration
	}{
		{"at the timeout", false, 1, timeout},
		{"at a second signal", true, 50, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var wg sync.WaitGroup
			for range tc.servers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					stopStuck(t, tc.second, timeout, tc.cutoff+stopGrace+stopSlack)
				}()
			}
			wg.Wait()
		})
	}
}

// stopSlack is what the bound allows over the cut-off and stopGrace: the
// scheduling of 50 servers stopping at once on a loaded machine (300 ms
// was once exceeded at load 20). A stop that waits for the stuck call
// waits forever, which the 10 s limit below tells apart.
const stopSlack = 2 * time.Second

// stopStuck serves a call that never returns and checks that stopServing
// returns within bound and aborts.
func stopStuck(t *testing.T, second bool, timeout, bound time.Duration) {
	l, err := net.Listen("unix", t.TempDir()+"/s.sock")
	if err != nil {
		t.Error(err)
		return
	}
	srv := grpc.NewServer()
	h := stuckHealth{entered: make(chan struct{}), release: make(chan struct{})}
	defer close(h.release)
	healthpb.RegisterHealthServer(srv, h)
	go srv.Serve(l)
	conn, err := grpc.NewClient("unix://"+l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Error(err)
		return
	}
	defer conn.Close()
	go healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{})
	<-h.entered

	signals := make(chan os.Signal, 1)
	if second {
		signals <- syscall.SIGTERM
	}
	var aborted atomic.Bool
	returned := make(chan struct{})
	start := time.Now()
	go func() {
		stopServing(context.Background(), srv, func() { aborted.Store(true) }, signals, timeout)
		close(returned)
	}()
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Errorf("stopServing still waiting for a stuck call after 10s (timeout %v)", timeout)
		return
	}
	if took := time.Since(start); took > bound {
		t.Errorf("stopServing took %v, want at most %v", took, bound)
	}
	if !aborted.Load() {
		t.Error("shared work was not aborted at the cut-off")
	}
}

// blockingCloser is a snapshotter whose Close waits for a transaction that
// never ends.
type blockingCloser chan struct{}

func (c blockingCloser) Close() error {
	<-c
	return nil
}

// TestCloseWithinBound: a close that bolt would hold forever (a call still
// in a transaction) gives up at its bound with an error.
func TestCloseWithinBound(t *testing.T) {
	c := make(blockingCloser)
	defer close(c)
	start := time.Now()
	err := closeWithin(c, 100*time.Millisecond)
	if err == nil {
		t.Fatal("closeWithin succeeded while Close blocks")
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("closeWithin took %v for a 100ms bound", took)
	}
}
