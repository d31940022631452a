package snapshotter

import (
	"context"

	"github.com/containerd/log"
)

// A stack deeper than max_stack mounts its bottom layers as one flattened
// layer, cut at a multiple of step counted from the bottom (see
// flattenedMount). A container on a 1000-layer image, with max_stack 500,
// stands on flat(750): 250 layers above the merged view of the bottom 750.
// The unpack's own mounts get by with flat(500) up to layer 999, so the
// container's first Prepare used to build flat(750): 1.2 s of the image's
// first run. Yet that layer's content is known once layer 750 is committed,
// while the rest of the image still unpacks.
//
// So a Commit half a step before the depth where mounts need a new cut
// builds that cut in the background: at layer 875 of that image, the cut
// at 750, which the next 125 layers' unpack hides. It is a guess that the
// stack grows on: wasted if the image ends in those 125 layers, once per
// image that deep, and used by every deeper stack on the same layers.

// preflattenCut returns the cut to build ahead once a stack of depth
// layers is committed, or 0.
func (s *Snapshotter) preflattenCut(depth int) int {
	step := max(s.maxStack/2, 1)
	ahead := depth + step/2 // the depth whose mounts need a new cut
	if s.mode != ModeOverlay || step < 2 || ahead <= s.maxStack || ahead%step != 0 {
		return 0
	}
	// What flattenedMount cuts for a stack of that depth, keeping at
	// most max_stack - 1 layers above the flattened one.
	return roundUp(ahead-(s.maxStack-1), step)
}

// deepActive notes an active snapshot whose Commit will build a cut ahead,
// with its chain (top first): Prepare knows the chain, Commit would have to
// walk the metadata for it. Only those few are held, and a restart forgets
// them (their mounts build the cut when they need it).
func (s *Snapshotter) deepActive(id string, parents []string) {
	if s.preflattenCut(len(parents)+1) > 0 {
		s.deepActives.Store(id, append([]string{id}, parents...))
	}
}

// preflatten builds, in the background, the cut ahead of the stack that
// active snapshot id ends, now committed, if deepActive noted it. A mount
// that needs it meanwhile waits for the same build (flatten's
// singleflight).
func (s *Snapshotter) preflatten(ctx context.Context, id string) {
	v, ok := s.deepActives.LoadAndDelete(id)
	if !ok {
		return
	}
	chain := v.([]string)
	cut := s.preflattenCut(len(chain))
	layers := chain[len(chain)-cut:] // the bottom cut layers, top first
	s.goBackground(func(life context.Context) {
		if err := s.flatten(life, layers); err != nil {
			log.G(ctx).WithError(err).WithField("id", layers[0]).Warn("failed to flatten a deep stack ahead of its mounts; the first mount that needs it builds it")
		}
	})
}

// goBackground runs fn in a goroutine that Close waits for, under the
// snapshotter's lifetime context, unless the snapshotter is closing; it
// says whether it did.
func (s *Snapshotter) goBackground(fn func(life context.Context)) bool {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	// Close aborts before it takes closeMu, and waits holding it: no
	// Add can come after its Wait started.
	if s.closed || s.life.Err() != nil {
		return false
	}
	s.background.Add(1)
	go func() {
		defer s.background.Done()
		fn(s.life)
	}()
	return true
}
