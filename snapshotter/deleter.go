package snapshotter

import (
	"os"
	"sync"

	"github.com/containerd/log"
)

// deleteWorkers is how many trashed directories are deleted at once.
// Deleting is metadata I/O on the root's one filesystem: more workers would
// contend for the same journal, and a GC of thousands of snapshots must not
// start thousands of goroutines and RemoveAlls at once.
const deleteWorkers = 2

// deleter empties the trash in the background: a queue served by at most
// deleteWorkers goroutines, which exit when the queue is empty. wait lets
// Close and Collect wait for what was queued before they were called,
// while Removes keep queueing.
type deleter struct {
	mu   sync.Mutex
	cond *sync.Cond // signalled whenever a deletion finishes
	// queue holds paths not yet taken by a worker, oldest first; seq
	// numbers every path ever queued, in order.
	queue   []queued
	seq     uint64
	running map[uint64]struct{} // seqs being deleted now
	// pending holds the paths queued or being deleted: Cleanup queues
	// the whole trash again, and what is already on its way must not
	// pile up behind it once per collection.
	pending map[string]struct{}
	// moves holds the directories queued by move, not yet taken.
	moves   map[string]struct{}
	workers int
}

type queued struct {
	seq  uint64
	path string
	from string // if set, renamed to path first (a Remove's directory)
}

func newDeleter() *deleter {
	d := &deleter{running: map[uint64]struct{}{}, pending: map[string]struct{}{}, moves: map[string]struct{}{}}
	d.cond = sync.NewCond(&d.mu)
	return d
}

// add queues paths for deletion, but those already pending; it never
// blocks on the disk.
func (d *deleter) add(paths ...string) {
	if len(paths) == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range paths {
		d.queueLocked(queued{path: p})
	}
	d.startLocked()
}

// move queues dir to be renamed to trashed, a name of its own in the
// trash, and deleted there. Whoever renames dir first (this or a Cleanup
// that finds it without metadata) takes it to the trash; the other finds
// nothing.
func (d *deleter) move(dir, trashed string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.queueLocked(queued{path: trashed, from: dir})
	d.moves[dir] = struct{}{}
	d.startLocked()
}

// moving says whether dir was queued by move and not taken yet.
func (d *deleter) moving(dir string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.moves[dir]
	return ok
}

func (d *deleter) queueLocked(q queued) {
	if _, ok := d.pending[q.path]; ok {
		return
	}
	d.pending[q.path] = struct{}{}
	d.seq++
	q.seq = d.seq
	d.queue = append(d.queue, q)
}

func (d *deleter) startLocked() {
	for d.workers < deleteWorkers && d.workers < len(d.queue) {
		d.workers++
		go d.work()
	}
}

func (d *deleter) work() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(d.queue) > 0 {
		q := d.queue[0]
		d.queue = d.queue[1:]
		d.running[q.seq] = struct{}{}
		if q.from != "" {
			delete(d.moves, q.from)
		}
		d.mu.Unlock()
		q.delete()
		d.mu.Lock()
		delete(d.running, q.seq)
		delete(d.pending, q.path)
		d.cond.Broadcast()
	}
	d.workers--
}

// wait returns once every path queued before the call is deleted. Paths
// queued meanwhile do not hold it up: the queue is served in order, so it
// waits only while the oldest pending path is one of its own.
func (d *deleter) wait() {
	d.mu.Lock()
	defer d.mu.Unlock()
	upTo := d.seq
	for d.oldest() <= upTo {
		d.cond.Wait()
	}
}

// oldest is the seq of the oldest path not yet deleted, or past the last
// seq when there is none.
func (d *deleter) oldest() uint64 {
	lowest := d.seq + 1
	if len(d.queue) > 0 {
		lowest = d.queue[0].seq
	}
	for s := range d.running {
		lowest = min(lowest, s)
	}
	return lowest
}

func (q queued) delete() {
	if q.from != "" {
		if err := os.Rename(q.from, q.path); err != nil {
			if !os.IsNotExist(err) {
				// Left in place: Cleanup finds it without
				// metadata and takes it to the trash.
				log.L.WithError(err).WithField("path", q.from).Warn("failed to move removed snapshot to the trash")
			}
			return
		}
	}
	if err := removeTree(q.path); err != nil {
		log.L.WithError(err).WithField("path", q.path).Warn("failed to delete from the trash")
	}
}
