package snapshotter

import (
	"os"
	"path/filepath"
	"testing"
)

// TestDeleterDropsPending: Cleanup queues the whole trash on every
// collection; a path already queued is not queued again, and once deleted
// it can be queued anew (a deletion that failed is retried by the next
// Cleanup).
func TestDeleterDropsPending(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "x")
	d := newDeleter()
	d.mu.Lock() // hold the workers off, so both adds see the first queued
	d.workers = deleteWorkers
	d.mu.Unlock()
	d.add(dir)
	d.add(dir, dir)
	d.mu.Lock()
	if len(d.queue) != 1 {
		t.Fatalf("%d queued for one path, want 1", len(d.queue))
	}
	d.workers = 0
	d.mu.Unlock()

	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	d.add(dir) // still pending: the first is not deleted yet
	d.mu.Lock()
	d.workers = deleteWorkers - 1
	d.mu.Unlock()
	d.add(filepath.Join(t.TempDir(), "y")) // starts a worker
	d.wait()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("%s not deleted: %v", dir, err)
	}
	if len(d.pending) != 0 {
		t.Fatalf("%d paths still pending after wait", len(d.pending))
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	d.add(dir)
	d.wait()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("%s queued again after its deletion, not deleted: %v", dir, err)
	}
}
