package snapshotter

import (
	"context"
	"slices"
	"sync"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	bolt "go.etcd.io/bbolt"
)

// update runs fn in a write transaction, which it may share with the
// writes of other calls made at the same time (group commit). It returns
// once the change is on disk, or failed alone.
//
// fn must change nothing but the metadata: it may run more than once, and
// a run may be rolled back.
func (s *Snapshotter) update(ctx context.Context, fn storage.TransactionCallback) error {
	return s.batch.update(ctx, fn)
}

// batcher groups concurrent writes into one bolt transaction and one
// fdatasync, as bolt's own Batch does (containerd's MetaStore hides the
// database, but hands out transaction contexts). bolt has a single writer,
// and each commit waits for the disk: with 64 clients writing, each used
// to wait behind up to 63 fdatasyncs. No write waits for a timer: the
// first caller runs alone at once, and whoever arrives while it commits
// joins the next batch, run by the first of them as soon as the disk is
// free. A single client's latency is what it was.
//
// A call that fails is taken out, the others run again without it, and it
// then runs alone, so that its error is its own and it can undo nobody
// else's change.
type batcher struct {
	ms   *storage.MetaStore
	tail dbTail // zeroed ahead by the write transactions (dbtail.go)

	mu      sync.Mutex
	pending []*batchCall
	leading bool // a caller is running a batch; the others wait
}

type batchCall struct {
	ctx  context.Context
	fn   storage.TransactionCallback
	err  error
	done chan struct{} // closed once err is set
	lead chan struct{} // closed when this call is to run the next batch
}

func (b *batcher) update(ctx context.Context, fn storage.TransactionCallback) error {
	c := &batchCall{ctx: ctx, fn: fn, done: make(chan struct{}), lead: make(chan struct{})}
	b.mu.Lock()
	b.pending = append(b.pending, c)
	lead := !b.leading
	b.leading = true
	b.mu.Unlock()
	if !lead {
		select {
		case <-c.done:
			return c.err
		case <-c.lead:
		}
	}

	b.mu.Lock()
	calls := b.pending
	b.pending = nil
	b.mu.Unlock()
	b.run(calls)

	// Hand on: the first of those who came meanwhile runs the next
	// batch, so that nobody serves batches after its own is done.
	b.mu.Lock()
	if len(b.pending) > 0 {
		close(b.pending[0].lead)
	} else {
		b.leading = false
	}
	b.mu.Unlock()
	return c.err
}

// run commits calls in one transaction, less those that fail, which then
// run alone.
func (b *batcher) run(calls []*batchCall) {
	if testHookBatch != nil {
		testHookBatch(len(calls))
	}
	var alone []*batchCall
	for len(calls) > 0 {
		failed, err := b.try(calls)
		if failed < 0 {
			for _, c := range calls {
				c.err = err
				close(c.done)
			}
			break
		}
		alone = append(alone, calls[failed])
		calls = slices.Delete(slices.Clone(calls), failed, failed+1)
	}
	for _, c := range alone {
		c.err = transact(c.ctx, b.ms, true, b.withTail(c.fn))
		close(c.done)
	}
}

// try runs calls in one transaction and commits it. If a call fails, the
// transaction is rolled back and try returns its index; otherwise -1 and
// the commit's result, which is every call's.
func (b *batcher) try(calls []*batchCall) (int, error) {
	if len(calls) == 1 {
		return -1, transact(calls[0].ctx, b.ms, true, b.withTail(calls[0].fn))
	}
	// The transaction is the batch's, not one caller's: no caller's
	// cancellation may roll back the others.
	ctx, tx, err := b.ms.TransactionContext(context.WithoutCancel(calls[0].ctx), true)
	if err != nil {
		return -1, err
	}
	if btx, ok := tx.(*bolt.Tx); ok {
		ctx = withBoltTx(ctx, btx)
	}
	for i, c := range calls {
		if err := c.fn(ctx); err != nil {
			tx.Rollback()
			return i, nil
		}
	}
	if btx, ok := tx.(*bolt.Tx); ok {
		b.tail.prepare(ctx, btx)
	}
	return -1, tx.Commit()
}

// withTail runs fn, then, if it succeeded, zeroes ahead in the file the
// transaction is about to write.
func (b *batcher) withTail(fn storage.TransactionCallback) storage.TransactionCallback {
	return func(ctx context.Context) error {
		if err := fn(ctx); err != nil {
			return err
		}
		if tx, err := boltTx(ctx); err == nil {
			b.tail.prepare(ctx, tx)
		}
		return nil
	}
}

// testHookBatch, when a test sets it, is told the size of every batch
// before it runs.
var testHookBatch func(calls int)
