package snapshotter

import (
	"context"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
)

// update runs fn in a write transaction. fn must change nothing but the
// metadata: it may run more than once, and a run may be rolled back.
func (s *Snapshotter) update(ctx context.Context, fn storage.TransactionCallback) error {
	return s.ms.WithTransaction(ctx, true, fn)
}
