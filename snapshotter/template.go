package snapshotter

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	cfs "github.com/containerd/continuity/fs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// templatesDir holds one formatted and laid out image per size class
// pooled: ROOT/images/ext4-<version>-<bytes>.
const templatesDir = "images"

// templateVersion names the format mkfsExt4 makes and what layOut puts
// in it; change it with them, so that images made after an upgrade are
// made the new way (older templates go at start). v1 held no dirs; v3
// grew the journal of big images (for the ballast's cut, reserve.go); v4
// records the limit (limitXattr) and has a 4 MiB journal again, as v2.
const templateVersion = "v4"

// maxTemplates bounds how many size classes get a template (each holds a
// few hundred KiB to a few MiB of metadata). Classes are powers of two, so
// limits from 32 MiB to 1 PiB fit; past this many, the pool formats each
// image of a class without a template.
const maxTemplates = 16

// imageTemplates formats an image of the pool by copying a template of
// its size class, formatted once: running mkfs.ext4 took 5-70 ms of a
// Prepare here (a fork and exec of a tool on a loaded node), a sparse
// copy of the few hundred KiB of metadata a fresh image holds takes about
// a millisecond, and on xfs and btrfs the copy is a reflink. The template
// is mounted once when made and laid out (layOut: the dirs and the base),
// so that an image copied from it is ready once mounted: the dirs cost a
// Prepare 1-3 ms more here, done in each image.
//
// A Prepare no pooled class serves does not wait for a template: laying
// one out ends with an unmount, which writes the journal back (4-16 ms
// here), so that Prepare formats its own image at exactly its limit (from
// a template of that size only if one is there, its limit being a class's
// size) and the pool's refill, right after it, makes the class's template
// (ensure) before the images it keeps ready.
//
// Copies share the filesystem UUID of their template, which ext4 does not
// mind: each is its own loop device and mount.
type imageTemplates struct {
	dir string
	mu  sync.Mutex // serializes making templates, which is rare
}

// format writes a formatted ext4 image of size bytes at target, an empty
// file the caller made, and says whether it is laid out (a copy of the
// size's template) or only formatted (no template of the size, or past
// maxTemplates classes).
func (tp *imageTemplates) format(ctx context.Context, target string, size int64) (laidOut bool, _ error) {
	tmpl := tp.path(size)
	if _, err := os.Lstat(tmpl); err != nil {
		return false, mkfs(ctx, target, size)
	}
	// Sparse-aware (SEEK_DATA extents with copy_file_range, which
	// reflinks where the filesystem can).
	if err := cfs.CopyFile(target, tmpl); err != nil {
		return false, fmt.Errorf("copy image template %s: %w", tmpl, err)
	}
	return true, nil
}

func (tp *imageTemplates) path(size int64) string {
	return filepath.Join(tp.dir, "ext4-"+templateVersion+"-"+strconv.FormatInt(size, 10))
}

// ensure makes the template of size if there is none, unless there are
// maxTemplates already (then it reports false). It is written under a
// temporary name and renamed, so that a template is never half made.
func (tp *imageTemplates) ensure(ctx context.Context, size int64) (bool, error) {
	tmpl := tp.path(size)
	if _, err := os.Lstat(tmpl); err == nil {
		return true, nil
	}
	tp.mu.Lock()
	defer tp.mu.Unlock()
	if _, err := os.Lstat(tmpl); err == nil {
		return true, nil
	}
	if err := os.MkdirAll(tp.dir, 0o700); err != nil {
		return false, fmt.Errorf("create %s: %w", tp.dir, err)
	}
	entries, err := os.ReadDir(tp.dir)
	if err != nil {
		return false, fmt.Errorf("list %s: %w", tp.dir, err)
	}
	if templateCount(entries) >= maxTemplates {
		return false, nil
	}
	f, err := os.CreateTemp(tp.dir, filepath.Base(tmpl)+".new-")
	if err != nil {
		return false, fmt.Errorf("create image template: %w", err)
	}
	tmp := f.Name()
	f.Close()
	defer os.Remove(tmp) // gone after the rename
	if err := mkfs(ctx, tmp, size); err != nil {
		return false, err
	}
	if err := layOutTemplate(tmp); err != nil {
		return false, err
	}
	if err := os.Rename(tmp, tmpl); err != nil {
		return false, fmt.Errorf("place image template %s: %w", tmpl, err)
	}
	log.G(ctx).WithField("path", tmpl).Info("made image template for a size limit")
	return true, nil
}

// layOutTemplate mounts the formatted template at path, lays it out and
// unmounts it. Closing the detached mount unmounts the filesystem before
// close returns (what was written is in the file, which the copies read),
// and the loop device clears itself.
func layOutTemplate(path string) error {
	mnt, err := mountImage(path)
	if err != nil {
		return err
	}
	err = layOut(mnt)
	unix.Close(mnt)
	if err != nil {
		return fmt.Errorf("lay out image template %s: %w", path, err)
	}
	return nil
}

// cleanLeftovers removes the half-made templates and the pooled images of
// a daemon that died, and templates of an older templateVersion; only at
// start, before anything is made.
func (tp *imageTemplates) cleanLeftovers(ctx context.Context) {
	entries, err := os.ReadDir(tp.dir)
	if err != nil {
		return // none made yet
	}
	for _, e := range entries {
		// .new-: a template being made; pool-: a pooled image (imagepool.go).
		old := strings.HasPrefix(e.Name(), "ext4-") && !strings.HasPrefix(e.Name(), "ext4-"+templateVersion+"-")
		if old || strings.Contains(e.Name(), ".new-") || strings.HasPrefix(e.Name(), "pool-") {
			if err := os.Remove(filepath.Join(tp.dir, e.Name())); err != nil {
				log.G(ctx).WithError(err).WithField("name", e.Name()).Warn("failed to remove half-made image template")
			}
		}
	}
}

// mkfs sizes the file at path and formats it as ext4.
func mkfs(ctx context.Context, path string, size int64) error {
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("size image %s: %w", path, err)
	}
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", append(mkfsExt4, path)...).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// templateCount counts the templates among entries of the templates dir,
// which also holds pooled images.
func templateCount(entries []os.DirEntry) int {
	n := 0
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "ext4-") {
			n++
		}
	}
	return n
}
