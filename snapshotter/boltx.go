package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	bolt "go.etcd.io/bbolt"
)

// boltTxKey carries the bolt transaction of a metadata transaction in its
// context. containerd's MetaStore keeps its own under a key of its own, so
// that overclone's bucket (beside containerd's "v1") could otherwise be
// reached only by opening a second transaction, which for a write would
// deadlock on bolt's single writer and for a read would not see the
// transaction's own changes.
type boltTxKey struct{}

// transact is ms.WithTransaction that also leaves the bolt transaction in
// the context for boltTx: the metadata calls and overclone's own bucket
// change in one transaction.
func transact(ctx context.Context, ms *storage.MetaStore, writable bool, fn storage.TransactionCallback) error {
	ctx, t, err := ms.TransactionContext(ctx, writable)
	if err != nil {
		return err
	}
	tx, ok := t.(*bolt.Tx)
	if !ok {
		t.Rollback()
		return fmt.Errorf("metadata transaction is %T, not a bolt transaction", t)
	}
	if err := fn(withBoltTx(ctx, tx)); err != nil {
		if rerr := t.Rollback(); rerr != nil {
			return errors.Join(err, fmt.Errorf("rollback: %w", rerr))
		}
		return err
	}
	if !writable {
		return t.Rollback()
	}
	if err := t.Commit(); err != nil {
		return fmt.Errorf("commit metadata: %w", err)
	}
	return nil
}

func withBoltTx(ctx context.Context, tx *bolt.Tx) context.Context {
	return context.WithValue(ctx, boltTxKey{}, tx)
}

// boltTx returns the bolt transaction transact (or the group commit) put
// in ctx.
func boltTx(ctx context.Context) (*bolt.Tx, error) {
	tx, ok := ctx.Value(boltTxKey{}).(*bolt.Tx)
	if !ok {
		return nil, errors.New("no metadata transaction in context")
	}
	return tx, nil
}
