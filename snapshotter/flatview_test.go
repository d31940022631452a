package snapshotter

import (
	"os"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// TestFlattenLabelBuildsWhatContainersUse: `overclone flatten KEY` (a view
// with FlattenLabel) builds the flattened layers a container on KEY stands
// on, so the container's Prepare builds nothing, and both mount the same
// lowers. A stack that fits in one mount gets nothing built.
func TestFlattenLabelBuildsWhatContainersUse(t *testing.T) {
	ctx, s := openTest(t, t.TempDir(), WithMode(ModeOverlay), WithMaxStack(6))
	flatten := snapshots.WithLabels(map[string]string{FlattenLabel: "true"})

	shallow := buildChain(ctx, t, s, "shallow", 3)
	if _, err := s.View(ctx, "shallow-flat", shallow, flatten); err != nil {
		t.Fatal(err)
	}
	if n := s.FlattenBuilds(); n != 0 {
		t.Fatalf("flattening a 3-layer stack that fits built %d layers", n)
	}

	// Cuts fall on multiples of max_stack/2 from the bottom: the unpack
	// of 9 layers flattened the bottom 3, and a container on the ninth is
	// the first to need the bottom 6 flattened. The Commit of layer 8
	// built those ahead (preflatten.go); they are taken away again, as
	// for a stack committed by a daemon that did not flatten ahead.
	top := buildChain(ctx, t, s, "deep", 9)
	s.background.Wait()
	ids, err := s.chain(ctx, top)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(s.flatPath(ids[9-6])); err != nil {
		t.Fatal(err)
	}
	built := s.FlattenBuilds()
	view, err := s.View(ctx, "deep-flat", top, flatten)
	if err != nil {
		t.Fatal(err)
	}
	if s.FlattenBuilds() == built {
		t.Fatalf("flattening a 9-layer stack with max_stack 6 built nothing")
	}
	built = s.FlattenBuilds()
	ctr, err := s.Prepare(ctx, "container", top)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.FlattenBuilds() - built; n != 0 {
		t.Fatalf("a container's Prepare after flatten built %d more flattened layers", n)
	}
	if got, want := lowerdir(view[0].Options), lowerdir(ctr[0].Options); got != want {
		t.Fatalf("the flatten view stands on %q, the container on %q", got, want)
	}
	if err := checkChain(ctx, t, s, snapshots.KindView, top, 9); err != nil {
		t.Fatal(err)
	}
}

func lowerdir(options []string) string {
	for _, o := range options {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			return v
		}
	}
	return ""
}
