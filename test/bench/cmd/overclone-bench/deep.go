package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
)

// deepRepeats is how many mounts follow the first at each depth.
const deepRepeats = 5

// upperDir is where a snapshot's writes go: the overlay's upperdir, or
// the bind mount's source.
func upperDir(mounts []mount.Mount) string {
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v
		}
	}
	return mounts[0].Source
}

// benchDeep builds one image layer by layer on overclone and the
// built-in, interleaved, and at each of p.depths times the first View +
// mount of its top (overclone flattens what does not fit in one mount
// there, once), then deepRepeats more. A failure is a result: the built-in is
// expected to fail past the kernel's 500 layers.
func (e *env) benchDeep() error {
	ts, err := e.open("deep", tOverclone, tOverlay)
	if err != nil {
		return err
	}
	defer closeAll(ts)
	target := e.tb.TempDir()
	maxDepth := slices.Max(e.p.depths)
	for i := 0; i < maxDepth; i++ {
		for _, t := range ts {
			if err := addLayer(e, t, i); err != nil {
				return err
			}
		}
		depth := i + 1
		if !slices.Contains(e.p.depths, depth) {
			continue
		}
		e.progress("deep: %d layers built", depth)
		if err := syncfs(e.dir); err != nil {
			return err
		}
		for _, t := range rotate(ts, depth) {
			// The first mount pays for any flattening; the later ones
			// show what every container start on this image costs.
			w := fmt.Sprintf("deep-%d", depth)
			var again []float64
			for n := 0; n <= deepRepeats; n++ {
				took, err := viewAndMount(e, t, fmt.Sprintf("view-%d-%d", depth, n), fmt.Sprintf("layer-%d", i), target, depth)
				op := "first View+mount"
				if n > 0 {
					op = "later View+mount"
				}
				if err != nil {
					e.rep.fail(e.fs(), w, op, t.name, t.baseline, err)
					break
				}
				if n == 0 {
					e.rep.add(e.fs(), w, op, t.name, t.baseline, "ms", []float64{took})
				} else {
					again = append(again, took)
				}
			}
			if len(again) > 0 {
				e.rep.add(e.fs(), w, "later View+mount", t.name, t.baseline, "ms", again)
			}
		}
	}
	return nil
}

// addLayer commits layer i on top of layer i-1: a file of its own and a
// new /top, written into the upper as the diff applier would.
func addLayer(e *env, t *target, i int) error {
	parent := ""
	if i > 0 {
		parent = fmt.Sprintf("layer-%d", i-1)
	}
	key := fmt.Sprintf("layer-%d-active", i)
	mounts, err := t.sn.Prepare(e.ctx, key, parent)
	if err != nil {
		return fmt.Errorf("%s layer %d: %w", t.name, i, err)
	}
	upper := upperDir(mounts)
	for name, content := range map[string]string{fmt.Sprintf("layer-%d", i): "x", "top": fmt.Sprint(i)} {
		if err := os.WriteFile(filepath.Join(upper, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return t.sn.Commit(e.ctx, fmt.Sprintf("layer-%d", i), key)
}

// viewAndMount times View + mount of parent, checks the top file, and
// unmounts and removes the view.
func viewAndMount(e *env, t *target, key, parent, target string, depth int) (float64, error) {
	start := time.Now()
	mounts, err := t.sn.View(e.ctx, key, parent)
	if err != nil {
		return 0, err
	}
	defer t.sn.Remove(e.ctx, key)
	if err := mount.All(mounts, target); err != nil {
		return 0, err
	}
	took := ms(time.Since(start))
	defer mount.UnmountAll(target, 0)
	got, err := os.ReadFile(filepath.Join(target, "top"))
	if err != nil {
		return 0, err
	}
	if string(got) != fmt.Sprint(depth-1) {
		return 0, fmt.Errorf("/top reads %q, want %d", got, depth-1)
	}
	return took, nil
}
