package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// callOps are the per-call latencies measured, in the order they run.
// With containerd's default asynchronous remove the built-in's Remove only
// drops metadata and its Cleanup deletes the directories, while overclone
// renames in Remove and deletes in the background: Remove alone would
// compare unlike work. So Cleanup (containerd's GC calls it after the
// removals of a collection) is a row of its own, and opDisk is what a
// removal costs until the disk is free again, deferred work included.
var callOps = []string{"Prepare", "View", "Mounts", "Stat", "Commit", "Walk", "Remove", "Cleanup", opDisk}

// opDisk is, per snapshot, a chunk's Removes, the Cleanup after them and
// the wait until the directories are deleted (for overclone, until its
// trash is empty; the built-in's Cleanup deletes before it returns).
const opDisk = "Remove+Cleanup until deleted"

// benchCalls measures each snapshots API call over p.calls snapshots per
// round, in process, through the same in-process gRPC hop, and through the
// real daemon. Calls run in chunks of callChunk, the targets taking turns
// chunk by chunk, so a burst of load on the machine hits all of them.
func (e *env) benchCalls() error {
	const callChunk = 50
	ts, err := e.open("calls", tOverclone, tNoSync, tOverlay, tOverlay2, tOCGRPC, tOvGRPC, tDaemon, tOvProc)
	if err != nil {
		return err
	}
	defer closeAll(ts)
	samples := map[string]map[string][]float64{}
	for _, t := range ts {
		samples[t.name] = map[string][]float64{}
	}
	n := e.p.calls
	for r := 0; r < e.p.callRounds; r++ {
		base := fmt.Sprintf("base-%d", r)
		for _, t := range ts {
			if err := commitEmpty(e.ctx, t.sn, base); err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
		}
		phase := func(op string, fn func(sn snapshots.Snapshotter, i int) error) error {
			for c := 0; c < n; c += callChunk {
				for _, t := range rotate(ts, r+c/callChunk) {
					for i := c; i < min(c+callChunk, n); i++ {
						start := time.Now()
						if err := fn(t.sn, i); err != nil {
							return fmt.Errorf("%s %s #%d: %w", t.name, op, i, err)
						}
						samples[t.name][op] = append(samples[t.name][op], ms(time.Since(start)))
					}
				}
			}
			return nil
		}
		active := func(i int) string { return fmt.Sprintf("a-%d-%d", r, i) }
		view := func(i int) string { return fmt.Sprintf("v-%d-%d", r, i) }
		committed := func(i int) string { return fmt.Sprintf("c-%d-%d", r, i) }
		steps := []struct {
			op string
			fn func(sn snapshots.Snapshotter, i int) error
		}{
			{"Prepare", func(sn snapshots.Snapshotter, i int) error { _, err := sn.Prepare(e.ctx, active(i), base); return err }},
			{"View", func(sn snapshots.Snapshotter, i int) error { _, err := sn.View(e.ctx, view(i), base); return err }},
			{"Mounts", func(sn snapshots.Snapshotter, i int) error { _, err := sn.Mounts(e.ctx, active(i)); return err }},
			{"Stat", func(sn snapshots.Snapshotter, i int) error { _, err := sn.Stat(e.ctx, active(i)); return err }},
			{"Commit", func(sn snapshots.Snapshotter, i int) error { return sn.Commit(e.ctx, committed(i), active(i)) }},
		}
		for _, s := range steps {
			if err := phase(s.op, s.fn); err != nil {
				return err
			}
		}
		// Walk lists every snapshot: the base, n views and n committed.
		for w := 0; w < e.p.walks; w++ {
			for _, t := range rotate(ts, r+w) {
				start := time.Now()
				count := 0
				if err := t.sn.Walk(e.ctx, func(context.Context, snapshots.Info) error { count++; return nil }); err != nil {
					return fmt.Errorf("%s Walk: %w", t.name, err)
				}
				samples[t.name]["Walk"] = append(samples[t.name]["Walk"], ms(time.Since(start)))
				if count != 2*n+1 {
					return fmt.Errorf("%s Walk saw %d snapshots, want %d", t.name, count, 2*n+1)
				}
			}
		}
		for _, key := range []func(int) string{view, committed} {
			for c := 0; c < n; c += callChunk {
				for _, t := range rotate(ts, r+c/callChunk) {
					if err := e.removeChunk(t, samples[t.name], key, c, min(c+callChunk, n)); err != nil {
						return err
					}
				}
			}
		}
		for _, t := range ts {
			if err := t.sn.Remove(e.ctx, base); err != nil {
				return fmt.Errorf("%s: remove %s: %w", t.name, base, err)
			}
			if err := t.sn.(snapshots.Cleaner).Cleanup(e.ctx); err != nil {
				return fmt.Errorf("%s: Cleanup: %w", t.name, err)
			}
		}
	}
	for _, op := range callOps {
		for _, t := range ts {
			e.rep.add(e.fs(), "calls", op, t.name, t.baseline, "ms", samples[t.name][op])
		}
	}
	return nil
}

// removeChunk removes the snapshots key(from) to key(to-1), each Remove
// timed, then calls Cleanup, timed, then waits until the directories are
// gone from disk, and records per snapshot what all of that took.
func (e *env) removeChunk(t *target, samples map[string][]float64, key func(int) string, from, to int) error {
	began := time.Now()
	for i := from; i < to; i++ {
		start := time.Now()
		if err := t.sn.Remove(e.ctx, key(i)); err != nil {
			return fmt.Errorf("%s Remove #%d: %w", t.name, i, err)
		}
		samples["Remove"] = append(samples["Remove"], ms(time.Since(start)))
	}
	start := time.Now()
	if err := t.sn.(snapshots.Cleaner).Cleanup(e.ctx); err != nil {
		return fmt.Errorf("%s Cleanup: %w", t.name, err)
	}
	samples["Cleanup"] = append(samples["Cleanup"], ms(time.Since(start)))
	if err := waitTrashEmpty(t.root); err != nil {
		return fmt.Errorf("%s: %w", t.name, err)
	}
	samples[opDisk] = append(samples[opDisk], ms(time.Since(began))/float64(to-from))
	return nil
}

// waitTrashEmpty waits until overclone's trash under root is empty: its
// background deleter is done. The built-in has no trash.
func waitTrashEmpty(root string) error {
	deadline := time.Now().Add(time.Minute)
	for {
		entries, err := os.ReadDir(filepath.Join(root, "trash"))
		if os.IsNotExist(err) || err == nil && len(entries) == 0 {
			return nil
		}
		if err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d entries still in %s/trash after a minute", len(entries), root)
		}
		time.Sleep(time.Millisecond)
	}
}

// commitEmpty commits an empty layer named name.
func commitEmpty(ctx context.Context, sn snapshots.Snapshotter, name string) error {
	if _, err := sn.Prepare(ctx, name+"-active", ""); err != nil {
		return err
	}
	return sn.Commit(ctx, name, name+"-active")
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
