package snapshotter

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// bolt grows its file with ftruncate, so the pages past the data are a
// hole, and a commit that writes a new page there has the filesystem
// allocate blocks: on xfs its fdatasync then forces the journal too, about
// 2 ms against 0.4-0.6 ms for an overwrite (strace of 200 Prepares, loop
// xfs). A snapshot with labels always grows the file: containerd's
// metadata store keeps them in a bucket inside the snapshot's, and a
// bucket holding a bucket is never stored inline, so each such snapshot
// takes a page of its own. That was all of a user-namespaced Prepare's
// extra time over a plain one (TestRemapCopyCost): a plain Prepare given
// two labels of the same size cost the same.
//
// So the write transactions zero the file's hole ahead of the data, once
// per dbTailAhead, with one fdatasync: later commits overwrite blocks
// that are there already. Only pages past the transaction's high-water
// mark are written, which nothing in the database references, under
// bolt's single writer, and never past the file's end: the file's size,
// and so bolt's own growth, are left as bolt makes them.
const dbTailAhead = 1 << 20

// dbTail remembers how far the file is zeroed. It is used only inside
// write transactions, which bolt runs one at a time.
type dbTail struct {
	zeroedTo int64
}

// prepare zeroes the hole ahead of tx's data if what is zeroed ahead runs
// short. A failure costs only speed: it is logged, not returned.
func (z *dbTail) prepare(ctx context.Context, tx *bolt.Tx) {
	hw := tx.Size()
	if hw+dbTailAhead/4 <= z.zeroedTo {
		return
	}
	if err := z.zero(tx.DB().Path(), hw); err != nil {
		log.G(ctx).WithError(err).Debug("zero ahead in the metadata file")
	}
}

func (z *dbTail) zero(path string, hw int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	from, end := max(hw, z.zeroedTo), min(hw+dbTailAhead, fi.Size())
	if from >= end {
		return nil
	}
	zeros := make([]byte, end-from)
	if _, err := f.WriteAt(zeros, from); err != nil {
		return fmt.Errorf("write zeros at %d: %w", from, err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("fdatasync: %w", err)
	}
	z.zeroedTo = end
	return nil
}
