package snapshotter

import "testing"

// TestPlacingRerunKeepsOthers: a group commit ran again without a failed
// create, so a create that had id 5 gets 6 and another gets 5. The first
// must not take the second's entry out: a snapshot being placed that
// Remove does not wait for lets its parent be removed under it (TestStorm
// saw a View's parent vanish that way).
func TestPlacingRerunKeepsOthers(t *testing.T) {
	var set placingSet
	first, second := set.start(), set.start()
	first.is("5")
	second.is("5") // the rerun gave the other create id 5...
	first.is("6")  // ...and this one 6
	if ids := set.all(); !ids["5"] || !ids["6"] || len(ids) != 2 {
		t.Fatalf("being placed: %v, want 5 and 6", ids)
	}
	first.finish()
	if ids := set.all(); !ids["5"] || len(ids) != 1 {
		t.Fatalf("after the first finished: %v, want 5", ids)
	}
	second.finish()
	if ids := set.all(); len(ids) != 0 {
		t.Fatalf("after both finished: %v", ids)
	}
}
