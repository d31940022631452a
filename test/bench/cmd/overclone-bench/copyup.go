package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/mount"

	"github.com/overclone/overclone/fileops"
)

const (
	copyFileSize = 64 << 10 // each of the small files a container rewrites
	copyWrite    = 4 << 10  // what it writes into each, at offset 0
	copyDirs     = 20
)

// copyRunner is one way of serving a container on a lower layer: through a
// snapshotter's mount, or (fileops) through overclone's copy-up engine on
// the same layer directories with no mount at all.
type copyRunner struct {
	name, baseline string
	t              *target
	viaFileops     bool
	fileopsOpts    []fileops.StackOpt
}

// benchCopyUp: a container-like write to p.copyFiles files of a lower
// layer, and a chmod of one big file (dense: written, not sparse), each in
// a fresh container per round. In overlay mode the kernel copies up; in
// userspace mode Prepare made the container's copy already (its time is
// reported beside); fileops copies up with CopyUp and writes the upper.
func (e *env) benchCopyUp() error {
	ts, err := e.open("copyup", tOverclone, tOverlay, tNative, tUserspace)
	if err != nil {
		return err
	}
	defer closeAll(ts)
	src := filepath.Join(e.dir, "big-source")
	if err := writeDense(src, e.p.bigFile); err != nil {
		return err
	}
	defer os.Remove(src)
	e.progress("dense %d MiB source written", e.p.bigFile>>20)
	var runners []copyRunner
	for _, t := range ts {
		if err := makeBase(e, t, src); err != nil {
			return fmt.Errorf("%s: %w", t.name, err)
		}
		runners = append(runners, copyRunner{name: t.name, baseline: t.baseline, t: t})
		if t.name == tOverclone {
			runners = append(runners,
				copyRunner{name: tFileops, baseline: tOverlay, t: t, viaFileops: true},
				// Without the fsync per file, to tell the engine's own cost
				// from the durability it pays for.
				copyRunner{name: tFileops + "-volatile", baseline: tOverlay, t: t, viaFileops: true, fileopsOpts: []fileops.StackOpt{fileops.WithVolatile()}})
		}
	}
	bigName := fmt.Sprintf("chmod %d MiB file", e.p.bigFile>>20)
	writeName := fmt.Sprintf("write %d files", e.p.copyFiles)
	type key struct{ runner, op string }
	samples := map[key][]float64{}
	dir := e.tb.TempDir()
	var smallPaths []string
	for i := 0; i < e.p.copyFiles; i++ {
		smallPaths = append(smallPaths, filePath("f", i, copyDirs))
	}
	for r := 0; r < e.p.copyRounds; r++ {
		for _, run := range rotate(runners, r) {
			if err := syncfs(e.dir); err != nil {
				return err
			}
			prep, took, err := e.copyRound(run, fmt.Sprintf("cu-%d", r), "cu-base", dir, smallPaths, func(root string) error {
				return rewriteFiles(root, e.p.copyFiles)
			})
			if err != nil {
				return fmt.Errorf("%s %s: %w", run.name, writeName, err)
			}
			samples[key{run.name, writeName}] = append(samples[key{run.name, writeName}], took)
			samples[key{run.name, "Prepare on " + writeName}] = append(samples[key{run.name, "Prepare on " + writeName}], prep)
		}
	}
	e.progress("copy-up of %d files: done", e.p.copyFiles)
	for r := 0; r < e.p.bigRounds; r++ {
		for _, run := range rotate(runners, r) {
			if err := syncfs(e.dir); err != nil {
				return err
			}
			prep, took, err := e.copyRound(run, fmt.Sprintf("ch-%d", r), "big-base", dir, []string{"big"}, func(root string) error {
				return os.Chmod(filepath.Join(root, "big"), 0o600)
			})
			if err != nil {
				return fmt.Errorf("%s %s: %w", run.name, bigName, err)
			}
			samples[key{run.name, bigName}] = append(samples[key{run.name, bigName}], took)
			samples[key{run.name, "Prepare on " + bigName}] = append(samples[key{run.name, "Prepare on " + bigName}], prep)
		}
	}
	for _, op := range []string{writeName, "Prepare on " + writeName, bigName, "Prepare on " + bigName} {
		for _, run := range runners {
			e.rep.add(e.fs(), "copyup", op, run.name, run.baseline, "ms", samples[key{run.name, op}])
		}
	}
	return nil
}

// copyRound prepares a container on base, runs op in it (through the
// mount, or through fileops on the layer directories), and tears it down.
// It returns the Prepare time and op's time.
func (e *env) copyRound(run copyRunner, key, base, dir string, paths []string, op func(root string) error) (float64, float64, error) {
	sn := run.t.sn
	start := time.Now()
	mounts, err := sn.Prepare(e.ctx, key+"-"+run.name, base)
	if err != nil {
		return 0, 0, err
	}
	prep := ms(time.Since(start))
	defer sn.Remove(e.ctx, key+"-"+run.name)
	if run.viaFileops {
		upper, lowers := layerDirs(mounts)
		stack, err := fileops.NewStack(upper, lowers, run.fileopsOpts...)
		if err != nil {
			return 0, 0, err
		}
		start = time.Now()
		// A container's write through fileops is a CopyUp of the file,
		// then the write into the upper's copy.
		for _, rel := range paths {
			if _, err := stack.CopyUp(e.ctx, rel); err != nil {
				return 0, 0, err
			}
		}
		err = op(upper)
		return prep, ms(time.Since(start)), err
	}
	if mounts[0].Type == "overlay" && !e.noted[run.name] {
		e.noted[run.name] = true
		e.rep.note("%s: %s mounts a container as %s %s", e.fs(), run.name, mounts[0].Type, strings.Join(mounts[0].Options, ","))
	}
	if err := mount.All(mounts, dir); err != nil {
		return 0, 0, err
	}
	defer mount.UnmountAll(dir, 0)
	start = time.Now()
	err = op(dir)
	return prep, ms(time.Since(start)), err
}

// layerDirs returns an overlay mount's upperdir and its lowerdirs, top
// first.
func layerDirs(mounts []mount.Mount) (string, []string) {
	var upper string
	var lowers []string
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			upper = v
		} else if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			lowers = strings.Split(v, ":")
		}
	}
	return upper, lowers
}

// makeBase commits cu-base (p.copyFiles files of 64 KiB) and big-base
// (one dense file, copied from src with copy_file_range: a reflink on xfs,
// a real copy on ext4) on t.
func makeBase(e *env, t *target, src string) error {
	mounts, err := t.sn.Prepare(e.ctx, "cu-base-active", "")
	if err != nil {
		return err
	}
	if err := writeFiles(upperDir(mounts), "f", e.p.copyFiles, copyDirs, copyFileSize); err != nil {
		return err
	}
	if err := t.sn.Commit(e.ctx, "cu-base", "cu-base-active"); err != nil {
		return err
	}
	mounts, err = t.sn.Prepare(e.ctx, "big-base-active", "")
	if err != nil {
		return err
	}
	if err := copyFile(src, filepath.Join(upperDir(mounts), "big")); err != nil {
		return err
	}
	return t.sn.Commit(e.ctx, "big-base", "big-base-active")
}

// rewriteFiles writes copyWrite bytes at the start of each file, as a
// container rewriting its config and state files does.
func rewriteFiles(root string, n int) error {
	buf := make([]byte, copyWrite)
	for i := 0; i < n; i++ {
		f, err := os.OpenFile(filepath.Join(root, filePath("f", i, copyDirs)), os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		_, err = f.WriteAt(buf, 0)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// writeDense writes size bytes of non-zero data, so that every block is
// allocated and no filesystem can elide it.
func writeDense(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*31 + 7)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		buf[0] = byte(off >> 20) // no two MiB alike
		if _, err := f.Write(buf[:min(int64(len(buf)), size-off)]); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil { // copy_file_range
		out.Close()
		return err
	}
	return out.Close()
}
