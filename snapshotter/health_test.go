package snapshotter

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestCheckHonoursDeadline: a health check whose probe hangs (a root write
// on a wedged disk, here held by a hook) returns at its context's deadline
// with DeadlineExceeded, so that /healthz's and the gRPC health service's
// 1 s bound holds; checks made while that probe still hangs join it rather
// than start one more.
func TestCheckHonoursDeadline(t *testing.T) {
	_, s := openTest(t, t.TempDir())
	release := make(chan struct{})
	var probes atomic.Int32
	testHookHealthProbe = func() {
		probes.Add(1)
		<-release
	}
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(func() {
		unblock()
		testHookHealthProbe = nil
	})

	for i := range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		start := time.Now()
		errc := make(chan error, 1)
		go func() { errc <- s.Check(ctx) }()
		select {
		case err := <-errc:
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("check %d on a hung probe: %v, want DeadlineExceeded", i, err)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("check %d returned %v after a 200ms deadline", i, took)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("check %d still running 5s after its 200ms deadline", i)
		}
		cancel()
	}
	if n := probes.Load(); n != 1 {
		t.Errorf("%d probes started while the first hung, want 1", n)
	}
	// Released, the probe writes its file in the root and removes it:
	// it must be done before the root is removed (once, in CI, the root's
	// removal found the file).
	s.health.mu.Lock()
	p := s.health.running
	s.health.mu.Unlock()
	unblock()
	if p != nil {
		<-p.done
	}
}

// TestCheckReusesSuccess: health checks within healthReuse of a successful
// probe take its answer: /healthz is unauthenticated and may be reachable
// from the network, and each probe writes a file in the root.
func TestCheckReusesSuccess(t *testing.T) {
	ctx, s := openTest(t, t.TempDir())
	var probes atomic.Int32
	testHookHealthProbe = func() { probes.Add(1) }
	t.Cleanup(func() { testHookHealthProbe = nil })
	for i := range 100 {
		if err := s.Check(ctx); err != nil {
			t.Fatalf("check %d: %v", i, err)
		}
	}
	if n := probes.Load(); n != 1 {
		t.Errorf("100 checks in a row wrote %d probes, want 1", n)
	}
}
