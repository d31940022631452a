package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// healthReuse is how long a successful health probe answers for later
// checks. /healthz is unauthenticated (and metrics_address may be on the
// node's network), and each probe writes a file in the root: a probe every
// few seconds at most bounds that, and a disk gone read-only is still seen
// well inside kubelet's default 10 s probe period. A failure is never
// reused, so a root that recovers is seen at the next check.
const healthReuse = 5 * time.Second

// healthState shares health probes between concurrent checks.
type healthState struct {
	mu sync.Mutex
	// reuse is healthReuse; tests that change the root between checks
	// set it to 0.
	reuse time.Duration
	// okUntil is when the last successful probe stops answering checks.
	okUntil time.Time
	// running is the probe in progress, if any: checks made while it
	// hangs wait for it rather than pile up goroutines and files behind
	// the same wedged disk.
	running *healthProbe
}

type healthProbe struct {
	done chan struct{}
	err  error
}

// Check answers whether the snapshotter can serve: the metadata database
// is open and readable, and the root takes a new file. A probe that only
// checked that the process is alive would keep a node whose disk went
// read-only (xfs shut down after an I/O error, ext4 remounted ro) in
// service, failing every Prepare.
//
// Check returns when ctx ends even if the probe does not: neither bolt nor
// a write on a hung filesystem can be interrupted, so the probe goes on in
// the background and the next check waits for that same probe.
func (s *Snapshotter) Check(ctx context.Context) error {
	s.closeMu.Lock()
	closed := s.closed
	s.closeMu.Unlock()
	if closed {
		return errors.New("snapshotter is closed")
	}
	h := &s.health
	h.mu.Lock()
	if time.Now().Before(h.okUntil) {
		h.mu.Unlock()
		return nil
	}
	p := h.running
	if p == nil {
		p = &healthProbe{done: make(chan struct{})}
		h.running = p
		go func() {
			err := s.probeHealth()
			h.mu.Lock()
			p.err = err
			if err == nil {
				h.okUntil = time.Now().Add(h.reuse)
			}
			h.running = nil
			h.mu.Unlock()
			close(p.done)
		}()
	}
	h.mu.Unlock()
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return fmt.Errorf("health check did not finish: %w", ctx.Err())
	}
}

// probeHealth reads the metadata and writes a file in the root. It runs
// under no caller's context: it is shared by every check that waits on it.
func (s *Snapshotter) probeHealth() error {
	if err := s.ms.WithTransaction(context.Background(), false, func(context.Context) error { return nil }); err != nil {
		return fmt.Errorf("read metadata: %w", err)
	}
	if testHookHealthProbe != nil {
		testHookHealthProbe()
	}
	f, err := os.CreateTemp(s.root, ".healthz-")
	if err != nil {
		return fmt.Errorf("root %s is not writable: %w", s.root, err)
	}
	name := f.Name()
	_, werr := f.Write([]byte("ok"))
	cerr := f.Close()
	rerr := os.Remove(name)
	if err := errors.Join(werr, cerr, rerr); err != nil {
		return fmt.Errorf("root %s is not writable: %w", s.root, err)
	}
	return nil
}

// testHookHealthProbe, when a test sets it, runs in every health probe
// between the metadata read and the root write: a test holds it to stand
// for a write on a hung filesystem, or counts probes.
var testHookHealthProbe func()

// DBPath is the metadata database's file.
func (s *Snapshotter) DBPath() string { return dbPath(s.root) }

func dbPath(root string) string { return root + "/metadata.db" }
