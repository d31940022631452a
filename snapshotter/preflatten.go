package snapshotter

import (
	"context"

	"github.com/containerd/log"
)

// A stack deeper than max_stack mounts its bottom layers as one flattened
// layer, cut at a multiple of step counted from the bottom (see
// flattenedMount). A container on a 1000-layer image, with max_stack 500,
// stands on flat(750): 250 layers above the merged view of the bottom 750.
// Nothing during the image's unpack needs that cut (the unpack's mounts
// get by with flat(500)), so the container's first Prepare used to build
// it: 1.2 s of the image's first run. Yet its content is known as soon as
// layer 750 is committed, while the image's remaining layers are still
// being unpacked.
//
// So a Commit that ends a stack at a cut past max_stack + step builds that
// cut's flattened layer in the background. It is a guess that the stack
// grows on, and a cheap one: only a stack already that deep pays for it,
// once per cut, and flat(d) is what every deeper stack on the same layers
// uses for its next step of layers. Shallower cuts are left to the
// mounts that need them, as an image of 500 to 750 layers would not.

// preflattenDepth says whether a committed stack of depth layers is a cut
// worth building before any mount asks for it.
func (s *Snapshotter) preflattenDepth(depth int) bool {
	step := max(s.maxStack/2, 1)
	return s.mode == ModeOverlay && depth%step == 0 && depth >= s.maxStack+step
}

// deepActive notes an active snapshot whose Commit will end a stack at
// such a cut, with its chain (top first): Prepare knows the chain, Commit
// would have to walk the metadata for it. Only those few are held, and a
// restart forgets them (their mounts build the cut when they need it).
func (s *Snapshotter) deepActive(id string, parents []string) {
	if s.preflattenDepth(len(parents) + 1) {
		s.deepActives.Store(id, append([]string{id}, parents...))
	}
}

// preflatten builds, in the background, the flattened layer of the stack
// active snapshot id ends, now committed, if deepActive noted it. A mount
// that needs it meanwhile waits for the same build (flatten's
// singleflight).
func (s *Snapshotter) preflatten(ctx context.Context, id string) {
	v, ok := s.deepActives.LoadAndDelete(id)
	if !ok {
		return
	}
	chain := v.([]string)
	s.goBackground(func(life context.Context) {
		if err := s.flatten(life, chain); err != nil {
			log.G(ctx).WithError(err).WithField("id", chain[0]).Warn("failed to flatten a deep stack ahead of its mounts; the first mount that needs it builds it")
		}
	})
}

// goBackground runs fn in a goroutine that Close waits for, under the
// snapshotter's lifetime context, unless the snapshotter is closing.
func (s *Snapshotter) goBackground(fn func(life context.Context)) {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	// Close aborts before it takes closeMu, and waits holding it: no
	// Add can come after its Wait started.
	if s.closed || s.life.Err() != nil {
		return
	}
	s.background.Add(1)
	go func() {
		defer s.background.Done()
		fn(s.life)
	}()
}
