package snapshotter

import (
	"context"
	"fmt"
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

// TestFlattenDeepStack: a 1000-layer image (a whiteout every tenth layer)
// prepared in overlay mode mounts and shows the right view, as a container
// and as a view. Its bottom layers are flattened once, however many
// Prepares race for them, without holding up calls on other snapshots, and
// the flattened layer goes with its snapshot.
func TestFlattenDeepStack(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	s, err := New(ctx, t.TempDir(), WithMode(ModeOverlay))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	top := buildChain(ctx, t, s, "deep", deepImage)
	unpacked := s.FlattenBuilds()
	t.Logf("unpacking %d layers flattened %d times", deepImage, unpacked)
	if unpacked > 3 {
		t.Errorf("unpacking %d layers flattened %d times; cuts on multiples of %d from the bottom make it 3", deepImage, unpacked, s.maxStack/2)
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

	flats, err := os.ReadDir(s.root + "/flat")
	if err != nil || uint64(len(flats)) != unpacked+1 {
		t.Fatalf("want %d flattened layers, got %v (%v)", unpacked+1, flats, err)
	}
	// Take the image down from the top: the flattened layer goes with
	// the snapshot it was made of.
	for _, key := range []string{"racer-a", "racer-b"} {
		if err := s.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	ids, err := s.chain(ctx, top)
	if err != nil {
		t.Fatal(err)
	}
	flatIDs := map[string]bool{}
	for _, f := range flats {
		flatIDs[f.Name()] = true
	}
	for i, id := range ids {
		if flatIDs[id] {
			there(t, s.flatPath(id))
		}
		if err := s.Remove(ctx, fmt.Sprintf("deep-layer-%d", deepImage-1-i)); err != nil {
			t.Fatal(err)
		}
		if flatIDs[id] {
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
