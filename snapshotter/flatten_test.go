package snapshotter

import (
	"context"
	"fmt"
	"maps"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
)

// deepImage is deeper than the kernel's 500 lower layers.
const deepImage = 1000

// flattenMaxStack is pinned, so that where the cuts fall does not depend
// on the kernel's depth limit (500 on every kernel since 3.18 anyway).
const flattenMaxStack = 500

// TestFlattenDeepStack: a 1000-layer image (a whiteout every tenth layer)
// prepared in overlay mode mounts and shows the right view, as a container
// and as a view. Cuts fall on multiples of max_stack/2 = 250 layers from
// the bottom: the unpack (Prepares on up to 999 parents, each keeping at
// most 499 of them) flattens at 250 and 500 (ahead, at layer 625's
// Commit), and at 750, ahead of the container on all 1000 that needs it,
// at layer 875's Commit. Its bottom
// layers are flattened once, however many Prepares race for them, without
// holding up calls on other snapshots, and the flattened layer goes with
// its snapshot.
func TestFlattenDeepStack(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	s, err := New(ctx, t.TempDir(), WithMode(ModeOverlay), WithMaxStack(flattenMaxStack))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.maxStack != flattenMaxStack {
		t.Fatalf("max_stack is %d: this kernel stacks fewer than %d lowers", s.maxStack, flattenMaxStack)
	}
	top := buildChain(ctx, t, s, "deep", deepImage)
	s.background.Wait()
	unpacked := s.FlattenBuilds()
	if unpacked != 3 {
		t.Errorf("unpacking %d layers flattened %d times; cuts on multiples of %d from the bottom make it 3, one of them ahead", deepImage, unpacked, s.maxStack/2)
	}
	ids, err := s.chain(ctx, top)
	if err != nil {
		t.Fatal(err)
	}
	// The cut the containers need, as a stack flattened before the
	// preflatten existed would lack it: they race to build it.
	if err := os.RemoveAll(s.flatPath(ids[deepImage-750])); err != nil {
		t.Fatal(err)
	}

	// Two containers start on the image at once.
	var wg sync.WaitGroup
	errs := make([]error, 2)
	done := make([]time.Time, 2)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = s.Prepare(ctx, "racer-"+string(rune('a'+i)), top)
			done[i] = time.Now()
		}()
	}
	// Meanwhile, a call that has nothing to do with the deep image.
	time.Sleep(5 * time.Millisecond)
	if _, err := s.Prepare(ctx, "unrelated", ""); err != nil {
		t.Fatal(err)
	}
	otherDone := time.Now()
	wg.Wait()
	for _, racer := range done {
		if !otherDone.Before(racer) {
			t.Errorf("an unrelated Prepare waited for the flattening")
		}
	}
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := s.FlattenBuilds() - unpacked; n != 1 {
		t.Fatalf("two Prepares on one deep parent built %d flattened layers, want 1", n)
	}
	for _, kind := range []snapshots.Kind{snapshots.KindView, snapshots.KindActive} {
		if err := checkChain(ctx, t, s, kind, top, deepImage); err != nil {
			t.Fatalf("%s of %d layers: %v", kind, deepImage, err)
		}
	}
	if n := s.FlattenBuilds() - unpacked; n != 1 {
		t.Fatalf("later mounts rebuilt the flattened layer: %d builds", n)
	}

	// The flattened layers are named for their top layer: the 250th,
	// 500th and 750th from the bottom.
	flats, err := os.ReadDir(s.root + "/flat")
	if err != nil {
		t.Fatal(err)
	}
	flatIDs := map[string]bool{}
	for _, f := range flats {
		flatIDs[f.Name()] = true
	}
	want := map[string]bool{}
	for cut := s.maxStack / 2; cut < deepImage; cut += s.maxStack / 2 {
		want[ids[len(ids)-cut]] = true
	}
	if !maps.Equal(flatIDs, want) {
		t.Fatalf("flattened layers %v, want the cuts at multiples of %d from the bottom: %v", flatIDs, s.maxStack/2, want)
	}
	// Take the image down from the top: the flattened layer goes with
	// the snapshot it was made of.
	for _, key := range []string{"racer-a", "racer-b"} {
		if err := s.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	for i, id := range ids {
		if flatIDs[id] {
			there(t, s.flatPath(id))
		}
		if err := s.Remove(ctx, fmt.Sprintf("deep-layer-%d", deepImage-1-i)); err != nil {
			t.Fatal(err)
		}
		if flatIDs[id] {
			s.deletions.wait()
			gone(t, s.flatPath(id))
		}
	}
}

// chain returns the ids of committed snapshot key and of every layer below
// it, top first.
func (s *Snapshotter) chain(ctx context.Context, key string) ([]string, error) {
	var ids []string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		for k := key; k != ""; {
			id, info, _, err := storage.GetInfo(ctx, k)
			if err != nil {
				return fmt.Errorf("snapshot %q: %w", k, err)
			}
			if info.Kind != snapshots.KindCommitted {
				return fmt.Errorf("snapshot %q is %s, not committed: %w", k, info.Kind, errdefs.ErrFailedPrecondition)
			}
			ids = append(ids, id)
			k = info.Parent
		}
		return nil
	})
	return ids, err
}
