package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// TestDBTailZeroedAhead: after the write transactions of labelled
// snapshots (each grows the database by a page), the metadata file has no
// hole between its data and the end of what is zeroed ahead, its size is
// what bolt made it, and the database is consistent.
func TestDBTailZeroedAhead(t *testing.T) {
	require.Root(t, "mounts a loop xfs")
	base := loopfs.Mount(t, loopfs.XFS)
	root := filepath.Join(base, "root")
	ctx, s := openTest(t, root)
	labels := snapshots.WithLabels(map[string]string{"containerd.io/snapshot/test": "value"})
	for i := 0; i < 100; i++ {
		if _, err := s.Prepare(ctx, fmt.Sprint("a", i), "", labels); err != nil {
			t.Fatal(err)
		}
	}
	var hw int64
	if err := transact(ctx, s.ms, false, func(ctx context.Context) error {
		tx, err := boltTx(ctx)
		if err != nil {
			return err
		}
		hw = tx.Size()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(root, "metadata.db")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	end := min(hw+dbTailAhead/4, fi.Size())
	hole, err := unix.Seek(int(f.Fd()), hw, unix.SEEK_HOLE)
	if err != nil {
		t.Fatal(err)
	}
	if hole < end {
		t.Errorf("hole at %d, between the data's end %d and %d (file size %d)", hole, hw, end, fi.Size())
	}
	if fi.Size()&(fi.Size()-1) != 0 {
		t.Errorf("file size %d is not bolt's (a power of two below 1 GiB)", fi.Size())
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			return err
		}
		return nil
	}); err != nil {
		t.Errorf("database check: %v", err)
	}
}
