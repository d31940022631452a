package snapshotter

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestUsageMaxAge: with usage_max_age an unlimited active's Usage is
// reused, never older than the bound: a file written after a walk shows
// only once the bound has passed; with 0 every call walks; a removed
// snapshot's entry goes with it.
func TestUsageMaxAge(t *testing.T) {
	const maxAge = 300 * time.Millisecond
	ctx, s := openTest(t, t.TempDir(), WithMode(ModeOverlay), WithUsageMaxAge(maxAge))
	if _, err := s.Prepare(ctx, "c", ""); err != nil {
		t.Fatal(err)
	}
	first, err := s.Usage(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	walked := time.Now()
	if err := os.WriteFile(filepath.Join(bindSource(ctx, t, s, "c"), "new"), make([]byte, usageFile), 0o644); err != nil {
		t.Fatal(err)
	}
	again, err := s.Usage(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	if time.Since(walked) < maxAge && again != first {
		t.Fatalf("within usage_max_age the usage changed: %+v then %+v (walked again)", first, again)
	}
	time.Sleep(time.Until(walked.Add(maxAge + 10*time.Millisecond)))
	fresh, err := s.Usage(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	if fresh.Inodes != first.Inodes+1 || fresh.Size < first.Size+usageFile {
		t.Fatalf("past usage_max_age: %+v, want the new file counted (before %+v)", fresh, first)
	}
	if err := s.Remove(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	s.usages.mu.Lock()
	left := len(s.usages.byID)
	s.usages.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d usage entries left after Remove", left)
	}

	ctx, exact := openTest(t, t.TempDir(), WithMode(ModeOverlay))
	if _, err := exact.Prepare(ctx, "c", ""); err != nil {
		t.Fatal(err)
	}
	before, _ := exact.Usage(ctx, "c")
	if err := os.WriteFile(filepath.Join(bindSource(ctx, t, exact, "c"), "new"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if after, _ := exact.Usage(ctx, "c"); after.Inodes != before.Inodes+1 {
		t.Fatalf("usage_max_age 0: %+v then %+v, want every call to walk", before, after)
	}
}
