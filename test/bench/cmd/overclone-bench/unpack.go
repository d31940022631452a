package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"
)

// benchUnpack unpacks the test image onto each snapshotter, several
// rounds, then runs the container start path and the userspace-against-
// native Prepare comparison on the last image unpacked.
func (e *env) benchUnpack() error {
	ts, err := e.open("unpack", tOverclone, tOverlay, tNative, tUserspace, tNoSync)
	if err != nil {
		return err
	}
	defer closeAll(ts)
	samples := map[string][]float64{}
	tops := map[string]string{}
	for r := 0; r < e.p.unpackRounds; r++ {
		prefix := fmt.Sprintf("img%d", r)
		for _, t := range rotate(ts, r) {
			// Those that copy the image on every Prepare take ten times
			// longer: fewer rounds, kept from the last.
			if copies(t) && r < e.p.unpackRounds-e.p.unpackCopy {
				continue
			}
			// Start each unpack from a clean page cache state: what the
			// previous one left dirty is written back now, untimed.
			if err := syncfs(e.dir); err != nil {
				return err
			}
			start := time.Now()
			top, err := e.img.unpack(e.ctx, t.sn, prefix)
			if err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			samples[t.name] = append(samples[t.name], ms(time.Since(start)))
			tops[t.name] = top
			e.progress("unpack round %d %s: %s", r, t.name, time.Since(start).Round(time.Millisecond))
		}
		if r == e.p.unpackRounds-1 {
			break
		}
		for _, t := range ts {
			if tops[t.name] != fmt.Sprintf("%s-%d", prefix, len(e.img.layers)-1) {
				continue // skipped this round
			}
			if err := e.img.removeChain(e.ctx, t.sn, prefix); err != nil {
				return fmt.Errorf("%s: remove image: %w", t.name, err)
			}
		}
	}
	for _, t := range ts {
		e.rep.add(e.fs(), "unpack", fmt.Sprintf("%d layers", len(e.img.layers)), t.name, t.baseline, "ms", samples[t.name])
	}
	if err := syncfs(e.dir); err != nil {
		return err
	}
	var start []*target
	for _, t := range ts {
		if t.name != tNoSync { // the same as overclone without a Commit
			start = append(start, t)
		}
	}
	began := time.Now()
	if err := e.benchStart(start, tops); err != nil {
		return err
	}
	e.progress("start path: %s", time.Since(began).Round(time.Millisecond))
	began = time.Now()
	err = e.benchPrepareBlocks(ts, tops)
	e.progress("prepare-vs-native: %s", time.Since(began).Round(time.Millisecond))
	return err
}

// copies reports whether Prepare on t copies the image (native, userspace
// mode), which makes the start path cost far more per run.
func copies(t *target) bool { return t.name == tNative || t.name == tUserspace }

// benchStart runs the container start path, Prepare on the image + mount
// + unmount + Remove, p.starts times (p.startsCopy for the snapshotters
// that copy the image on Prepare), in chunks the targets take turns at.
func (e *env) benchStart(ts []*target, tops map[string]string) error {
	const chunk = 10
	prep, whole := map[string][]float64{}, map[string][]float64{}
	dirs := map[string]string{}
	for _, t := range ts {
		dirs[t.name] = e.tb.TempDir()
	}
	for c := 0; ; c++ {
		ran := false
		for _, t := range rotate(ts, c) {
			n := e.p.starts
			if copies(t) {
				n = e.p.startsCopy
			}
			for i := c * chunk; i < min((c+1)*chunk, n); i++ {
				ran = true
				key := fmt.Sprintf("ctr-%d", i)
				t0 := time.Now()
				mounts, err := t.sn.Prepare(e.ctx, key, tops[t.name])
				if err != nil {
					return fmt.Errorf("%s start #%d: %w", t.name, i, err)
				}
				t1 := time.Now()
				if err := mount.All(mounts, dirs[t.name]); err != nil {
					return fmt.Errorf("%s start #%d: mount: %w", t.name, i, err)
				}
				if err := mount.UnmountAll(dirs[t.name], 0); err != nil {
					return fmt.Errorf("%s start #%d: unmount: %w", t.name, i, err)
				}
				if err := t.sn.Remove(e.ctx, key); err != nil {
					return fmt.Errorf("%s start #%d: remove: %w", t.name, i, err)
				}
				prep[t.name] = append(prep[t.name], ms(t1.Sub(t0)))
				whole[t.name] = append(whole[t.name], ms(time.Since(t0)))
			}
		}
		if !ran {
			break
		}
	}
	for _, t := range ts {
		e.rep.add(e.fs(), "start", "Prepare", t.name, t.baseline, "ms", prep[t.name])
	}
	for _, t := range ts {
		e.rep.add(e.fs(), "start", "Prepare+mount+umount+Remove", t.name, t.baseline, "ms", whole[t.name])
	}
	return nil
}

// benchPrepareBlocks compares userspace mode's Prepare with native's on
// the unpacked image: time, and the data blocks it took, from statfs's
// free blocks before and after, each read after a syncfs so that delayed
// allocation has happened. Snapshots are removed only at the end, since
// overclone removes in the background and would free blocks mid-count.
func (e *env) benchPrepareBlocks(ts []*target, tops map[string]string) error {
	var sel []*target
	for _, t := range ts {
		if t.name == tUserspace || t.name == tNative || t.name == tOverlay {
			sel = append(sel, t)
		}
	}
	took, used := map[string][]float64{}, map[string][]float64{}
	rounds := e.p.blockRounds
	if !e.kind.Reflinks() {
		rounds = 1
	}
	for r := 0; r < rounds; r++ {
		for _, t := range rotate(sel, r) {
			before, err := freeBytes(e.dir)
			if err != nil {
				return err
			}
			start := time.Now()
			if _, err := t.sn.Prepare(e.ctx, fmt.Sprintf("blk-%d", r), tops[t.name]); err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			took[t.name] = append(took[t.name], ms(time.Since(start)))
			after, err := freeBytes(e.dir)
			if err != nil {
				return err
			}
			used[t.name] = append(used[t.name], float64(before-after)/1024)
		}
	}
	for _, t := range sel {
		e.rep.add(e.fs(), "prepare-vs-native", "Prepare time", t.name, tNative, "ms", took[t.name])
	}
	for _, t := range sel {
		e.rep.add(e.fs(), "prepare-vs-native", "Prepare data", t.name, tNative, "KiB", used[t.name])
	}
	for _, t := range sel {
		for r := 0; r < rounds; r++ {
			if err := t.sn.Remove(e.ctx, fmt.Sprintf("blk-%d", r)); err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
		}
	}
	return nil
}

// freeBytes syncs the filesystem dir is on and returns its free bytes.
func freeBytes(dir string) (int64, error) {
	if err := syncfs(dir); err != nil {
		return 0, err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(st.Bfree) * st.Bsize, nil
}

func syncfs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", filepath.Clean(dir), err)
	}
	return nil
}
