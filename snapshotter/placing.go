package snapshotter

import (
	"sync"
)

// placingSet holds the snapshots whose metadata is committed but whose
// directory is not renamed into place yet. Prepare and View commit first
// and place after, so for a moment a snapshot exists without its
// directory: whatever would look at that directory waits for it (wait),
// and the check for missing directories skips it (all).
type placingSet struct {
	mu  sync.Mutex
	ids map[string]chan struct{}
}

// placement is one create's entry in the set.
type placement struct {
	set      *placingSet
	id       string
	done     chan struct{}
	finished bool
}

func (p *placingSet) start() *placement {
	return &placement{set: p, done: make(chan struct{})}
}

// is records the id the create's transaction allocated. The transaction
// may run again (a group commit retried without a peer that failed) and
// allocate another id: the last one counts.
func (pl *placement) is(id string) {
	p := pl.set
	p.mu.Lock()
	defer p.mu.Unlock()
	// Only our own entry: in the run before, another create of the group
	// may have been given that id and registered it since.
	if pl.id != "" && p.ids[pl.id] == pl.done {
		delete(p.ids, pl.id)
	}
	if p.ids == nil {
		p.ids = map[string]chan struct{}{}
	}
	pl.id = id
	p.ids[id] = pl.done
}

// finish takes the entry out of the set and wakes whoever waits for it. It
// may be called more than once.
func (pl *placement) finish() {
	p := pl.set
	p.mu.Lock()
	defer p.mu.Unlock()
	if pl.id != "" && p.ids[pl.id] == pl.done {
		delete(p.ids, pl.id)
	}
	if !pl.finished {
		close(pl.done)
		pl.finished = true
	}
	pl.id = ""
}

// wait returns once snapshot id is not being placed.
func (p *placingSet) wait(id string) {
	p.mu.Lock()
	ch, ok := p.ids[id]
	p.mu.Unlock()
	if ok {
		<-ch
	}
}

// all returns the ids being placed now.
func (p *placingSet) all() map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := make(map[string]bool, len(p.ids))
	for id := range p.ids {
		ids[id] = true
	}
	return ids
}
