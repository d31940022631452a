package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// benchCommit writes a layer of p.commitFiles small files into a fresh
// active snapshot (untimed), then times Usage of the active snapshot (what
// CRI calls every 10 s), Commit, and Usage of the committed layer.
func (e *env) benchCommit() error {
	ts, err := e.open("commit", tOverclone, tOverlay, tNative, tUserspace, tNoSync)
	if err != nil {
		return err
	}
	defer closeAll(ts)
	type key struct{ target, op string }
	samples := map[key][]float64{}
	ops := []string{"Usage(active)", "Commit", "Usage(committed)"}
	for r := 0; r < e.p.commitRounds; r++ {
		for _, t := range rotate(ts, r) {
			active, name := fmt.Sprintf("big-%d-active", r), fmt.Sprintf("big-%d", r)
			mounts, err := t.sn.Prepare(e.ctx, active, "")
			if err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			if err := syncfs(e.dir); err != nil {
				return err
			}
			if err := writeFiles(upperDir(mounts), "f", e.p.commitFiles, 100, 2048); err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			steps := []func() error{
				func() error { _, err := t.sn.Usage(e.ctx, active); return err },
				func() error { return t.sn.Commit(e.ctx, name, active) },
				func() error { _, err := t.sn.Usage(e.ctx, name); return err },
			}
			for i, step := range steps {
				start := time.Now()
				if err := step(); err != nil {
					return fmt.Errorf("%s %s: %w", t.name, ops[i], err)
				}
				samples[key{t.name, ops[i]}] = append(samples[key{t.name, ops[i]}], ms(time.Since(start)))
			}
			if err := t.sn.Remove(e.ctx, name); err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
		}
	}
	for _, op := range ops {
		for _, t := range ts {
			e.rep.add(e.fs(), fmt.Sprintf("commit-%dk", e.p.commitFiles/1000), op, t.name, t.baseline, "ms", samples[key{t.name, op}])
		}
	}
	return nil
}

// writeFiles writes n files of size bytes named prefix<i> under dir,
// spread over dirs subdirectories.
func writeFiles(dir, prefix string, n, dirs, size int) error {
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i*7 + 1)
	}
	for d := 0; d < dirs; d++ {
		if err := os.MkdirAll(filepath.Join(dir, fmt.Sprintf("d%03d", d)), 0o755); err != nil {
			return err
		}
	}
	for i := 0; i < n; i++ {
		if err := os.WriteFile(filepath.Join(dir, filePath(prefix, i, dirs)), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func filePath(prefix string, i, dirs int) string {
	return filepath.Join(fmt.Sprintf("d%03d", i%dirs), fmt.Sprintf("%s%05d", prefix, i))
}
