package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// The inodes of a limited snapshot on the qgroup path.
//
// A qgroup counts bytes, not inodes, and btrfs keeps no inode counter for
// a subvolume (statfs says f_files 0): an exact count is a search of the
// subvolume's tree (btrfsCountInodes), about 0.5-0.9 µs an inode, 48-90
// ms for 100k files. CRI asks for every container's Usage every 10 s. So once
// a snapshot has a count, Usage never searches on its call path: it
// answers with the bytes, fresh from the qgroup, and the last count; when
// the tree changed since that count (one search call that reads the
// tree's root node says so), it asks for a recount in the background and
// still answers with the last one. A recount runs at most once per
// interval per snapshot, one at a time per snapshot, and on at most
// inodeRecountWorkers at once for the whole daemon.
//
// So the inode figure trails the tree by at most the interval plus one
// count (and the wait for a worker) while someone polls, as CRI does.
// One that asks rarely is not answered from a count older than that:
// where the figure was last known exact more than two intervals ago (or
// never: the first Usage after Prepare or after a restart), Usage waits
// for the count. That first count is small after a Prepare (an empty
// upper); after a restart it is what every Usage cost before counts were
// kept, once per snapshot. Answering 0 until a background count ends
// would be quicker, but wrong, and 0 inodes is what the kubelet would
// then rank the container by.

// inodeRecountInterval is the least time between two counts of one
// snapshot's inodes. A container that writes all the time changes its tree
// between every two of CRI's polls: counting at each poll cost 200 such
// containers of 500 files 66-112 ms of CPU every 10 s, 0.66-1.1 % of a
// core (TestQgroupMeasure, at different loads); every 30 s it is a third
// of that. The kubelet reads a container's inodes to report them and to
// rank pods when the node runs short of inodes, a signal
// (nodefs.inodesFree) it takes from statfs, always fresh; the bytes its
// ephemeral-storage eviction reads are never stale. Where the operator
// set usage_max_age longer, that is the interval: walks of unlimited
// snapshots may be that old too.
const inodeRecountInterval = 30 * time.Second

// inodeRecountWorkers is how many counts run at once, all snapshots
// together: a count is CPU spent in the kernel, and one at a time keeps
// it to one core however many containers changed. 200 containers of 500
// files take about 0.06 s to count, 200 of 100k files 10-18 s: each
// within an interval.
const inodeRecountWorkers = 1

// recountInterval is the interval for a daemon whose usage_max_age is
// maxAge.
func recountInterval(maxAge time.Duration) time.Duration {
	return max(inodeRecountInterval, maxAge)
}

// inodeCounts keeps the inode count of each limited snapshot's subvolume
// and redoes it in the background.
type inodeCounts struct {
	// interval is the least time between two counts of one snapshot;
	// maxLag is how long ago a figure may have been exact for Usage to
	// answer with it without waiting for a count (two intervals).
	interval, maxLag time.Duration
	// run starts fn in the background, where Close waits for it
	// (goBackground); false once closing. life ends as Close begins.
	run   func(fn func(life context.Context)) bool
	life  context.Context
	slots chan struct{} // inodeRecountWorkers

	// onCount, if set (tests), is called as a count of dir starts, and
	// what it returns when that count ends.
	onCount func(dir string) (end func())

	mu    sync.Mutex
	byDir map[string]*inodeCount // by snapshot directory
}

// inodeCount is what is known of one subvolume's inodes.
type inodeCount struct {
	subvol  uint64
	counted bool // n, gen, settled and started hold a count
	n       int64
	// gen is the newest generation of the leaves the count read. If
	// settled, the transaction that wrote that leaf had ended before the
	// count began, so a tree with no leaf newer than gen is unchanged
	// since; until it has ended, that leaf could change again without
	// its generation moving.
	gen     uint64
	settled bool
	started time.Time // when the count began: the next not before interval later
	exactAt time.Time // when n was last known exact: started, or a later check that found no change
	recount *recount  // scheduled or running; nil if none
}

// recount is one count of a snapshot's inodes, scheduled or running.
type recount struct {
	done   chan struct{} // closed when it ended, n or err set
	n      int64
	err    error
	ctx    context.Context // ends with the snapshotter, or at forget
	cancel context.CancelFunc
}

// errClosing is the error of a count asked for as the snapshotter closes.
var errClosing = errors.New("snapshotter is closing")

func (c *inodeCounts) init(life context.Context, run func(func(context.Context)) bool, interval time.Duration) {
	c.run, c.life = run, life
	c.interval, c.maxLag = interval, 2*interval
	c.slots = make(chan struct{}, inodeRecountWorkers)
}

// inodes is how many inodes the subvolume id, open as fd, the directory
// dir of a snapshot, holds: the last count, unless it is too old to answer
// with (see above). A changed tree gets a recount in the background.
func (c *inodeCounts) inodes(ctx context.Context, dir string, fd int, id uint64) (int64, error) {
	now := time.Now()
	c.mu.Lock()
	e := c.byDir[dir]
	if e == nil || e.subvol != id {
		c.forgetLocked(dir)
		e = &inodeCount{subvol: id}
		if c.byDir == nil {
			c.byDir = map[string]*inodeCount{}
		}
		c.byDir[dir] = e
	}
	if e.counted && e.settled && e.recount == nil {
		gen := e.gen
		c.mu.Unlock()
		changed, err := btrfsChangedSince(fd, id, gen)
		if err != nil {
			return 0, err
		}
		c.mu.Lock()
		if !changed || e.gen != gen { // unchanged, or a count that began since landed
			if !changed && e.gen == gen {
				e.exactAt = now
			}
			n := e.n
			c.mu.Unlock()
			return n, nil
		}
	}
	r := e.recount
	schedule := r == nil && c.byDir[dir] == e
	due := e.started.Add(c.interval)
	if schedule {
		r = &recount{done: make(chan struct{})}
		r.ctx, r.cancel = context.WithCancel(c.life)
		e.recount = r
	}
	fresh := e.counted && now.Sub(e.exactAt) <= c.maxLag
	n := e.n
	c.mu.Unlock()
	if schedule {
		c.schedule(dir, e, r, fd, due)
	}
	if fresh {
		return n, nil
	}
	if r == nil { // forgotten meanwhile, never counted
		return 0, fmt.Errorf("count inodes of %s: snapshot removed: %w", dir, unix.ENOENT)
	}
	select {
	case <-r.done:
		return r.n, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// schedule starts r, e's recount, in the background on a descriptor of its
// own (the subvolume fd is, whatever becomes of dir's name), once due has
// come.
func (c *inodeCounts) schedule(dir string, e *inodeCount, r *recount, fd int, due time.Time) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		c.end(dir, e, r, inodeCount{}, fmt.Errorf("dup the descriptor of %s: %w", dir, err))
		return
	}
	// Not under c.mu: run takes the lock Close holds while it waits for
	// the recounts, which take c.mu as they end.
	started := c.run(func(context.Context) {
		defer unix.Close(dup)
		got, err := c.countAt(r.ctx, dir, dup, e.subvol, due)
		if err != nil && r.ctx.Err() == nil && !errors.Is(err, unix.ENOENT) {
			log.G(r.ctx).WithError(err).WithField("dir", dir).Warn("failed to count the inodes of a size-limited snapshot: its Usage keeps the last count")
		}
		c.end(dir, e, r, got, err)
	})
	if !started {
		unix.Close(dup)
		c.end(dir, e, r, inodeCount{}, errClosing)
	}
}

// end records r's outcome in e: a count replaces the last one; a failure
// keeps it, and drops an entry that never had one, so that the next Usage
// asks again, or whose subvolume is gone (ENOENT: a Usage that opened it
// just before Remove forgot it may have added the entry after).
func (c *inodeCounts) end(dir string, e *inodeCount, r *recount, got inodeCount, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e.recount == r {
		e.recount = nil
	}
	if err == nil {
		e.counted, e.n, e.gen, e.settled, e.started, e.exactAt = true, got.n, got.gen, got.settled, got.started, got.started
	} else if (!e.counted || errors.Is(err, unix.ENOENT)) && c.byDir[dir] == e {
		delete(c.byDir, dir)
	}
	r.n, r.err = got.n, err
	r.cancel()
	close(r.done)
}

// countAt counts the inodes of subvolume id, open as fd, once due has come
// and a worker is free.
func (c *inodeCounts) countAt(ctx context.Context, dir string, fd int, id uint64, due time.Time) (inodeCount, error) {
	if d := time.Until(due); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return inodeCount{}, ctx.Err()
		}
	}
	select {
	case c.slots <- struct{}{}:
		defer func() { <-c.slots }()
	case <-ctx.Done():
		return inodeCount{}, ctx.Err()
	}
	if c.onCount != nil {
		defer c.onCount(dir)()
	}
	if err := ctx.Err(); err != nil { // forgotten while it waited
		return inodeCount{}, err
	}
	// What the transaction generations were before the search began
	// decides whether its newest leaf can still change unseen: it cannot
	// if a later transaction had started (the filesystem's generation),
	// or if the subvolume's root item, which a commit updates, names it
	// and the subvolume is older than it (a new subvolume's root item
	// names the transaction making it from the start).
	start := time.Now()
	fsGen, err := btrfsGeneration(fd)
	if err != nil {
		return inodeCount{}, err
	}
	committed, made, err := btrfsRootGenerations(fd)
	if err != nil {
		return inodeCount{}, err
	}
	n, newest, err := btrfsCountInodes(ctx, fd, id)
	if err != nil {
		return inodeCount{}, err
	}
	return inodeCount{
		n: n, gen: newest, started: start,
		settled: newest < fsGen || (newest <= committed && made < committed),
	}, nil
}

// forget drops what is kept of the snapshot directory dir, and stops its
// recount if one is scheduled or running: what it would find is not kept.
func (q *btrfsQuotas) forget(dir string) {
	if q == nil {
		return
	}
	q.counts.mu.Lock()
	q.counts.forgetLocked(dir)
	q.counts.mu.Unlock()
}

func (c *inodeCounts) forgetLocked(dir string) {
	e := c.byDir[dir]
	if e == nil {
		return
	}
	delete(c.byDir, dir)
	if e.recount != nil {
		e.recount.cancel()
	}
}
