package metrics

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// walkCounter is a snapshotter whose only call is a Walk that counts.
type walkCounter struct {
	snapshots.Snapshotter
	walks atomic.Int32
}

func (w *walkCounter) Walk(ctx context.Context, fn snapshots.WalkFunc, _ ...string) error {
	w.walks.Add(1)
	return fn(ctx, snapshots.Info{Name: "a", Kind: snapshots.KindCommitted})
}

// TestScrapesShareOneWalk: scrapes in a row read the metadata once; the
// metrics address may be reachable from the network and is not
// authenticated, and each count is a walk of every snapshot.
func TestScrapesShareOneWalk(t *testing.T) {
	sn := &walkCounter{}
	reg := NewRegistry(sn, "/nonexistent/metadata.db")
	for i := range 50 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatalf("scrape %d: %v", i, err)
		}
		var committed float64
		for _, mf := range mfs {
			if mf.GetName() != "overclone_snapshots" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "kind" && l.GetValue() == "committed" {
						committed = m.GetGauge().GetValue()
					}
				}
			}
		}
		if committed != 1 {
			t.Fatalf("scrape %d: %v committed snapshots, want 1", i, committed)
		}
	}
	if n := sn.walks.Load(); n != 1 {
		t.Errorf("50 scrapes in a row walked the metadata %d times, want 1", n)
	}
}
