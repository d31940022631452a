package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
)

// poolSize is how many images of each pooled class are kept ready. CRI
// starts a pod's sandbox and then its containers one after another, and
// each refill takes a few milliseconds in the background: two cover a
// pod without waiting.
const poolSize = 2

// poolSizes bounds how many size classes are pooled at once: that of
// default_max_size (always) and those most recently asked for, the least
// recently asked for let go first. Each pooled class holds poolSize loop
// devices and mounts doing nothing; nodes run pods of a few specs at a
// time, and a class serves limits from a quarter of it up (ballast.go).
const poolSizes = 4

// imagePool keeps images formatted and mounted, detached, with their dirs
// made, their base recorded and their free space taken by a ballast, so
// that a limited Prepare only renames one into its directory, cuts its
// ballast back to the limit and moves its mount: measured, formatting and
// mounting an image cost a Prepare 3-9 ms, the ext4 mount most of it.
// Images are pooled by size class (ballast.go): the class of
// default_max_size from the start and, once a limit asks for one, each of
// the poolSizes-1 classes asked for most recently. A limit takes the
// smallest pooled class from itself to classSpan times itself; when none
// is pooled, its Prepare makes its own image at exactly the limit, and its
// class joins the pool, so that every later limit it serves is warm.
// default_max_size's images have their ballast cut for it by the refill:
// a Prepare with the default cuts nothing (a cut of a big class frees
// tens of GiB, milliseconds), and they serve larger limits of their class
// too, not smaller ones.
//
// The images wait in ROOT/images/pool-*: a daemon that dies leaves the
// files (the kernel dissolves their detached mounts and clears their loop
// devices with the process), and the next start removes them.
type imagePool struct {
	templates *imageTemplates
	dir       string

	mu      sync.Mutex
	sizes   []*pooledSize // most recently asked for first
	retired []pooledImage // of classes let go of, for the refill to release
	filling bool
	closed  bool
	fills   sync.WaitGroup
}

// pooledSize is the ready images of one size class.
type pooledSize struct {
	size int64 // the class
	// cutFor, if set, is the limit the images' ballasts are cut for
	// already (default_max_size's); pinned: never let go.
	cutFor int64
	pinned bool
	ready  []pooledImage
}

// serves tells whether ps's images can hold a limit of size: one of its
// class, not below what their ballasts are cut for.
func (ps *pooledSize) serves(size int64) bool {
	return serves(ps.size, size) && size >= ps.cutFor
}

type pooledImage struct {
	path string
	img  *loopImage
}

var poolSeq atomic.Uint64

// init sets up an empty pool that keeps images of the class of
// defaultSize (0: none), cut for it, and of the classes asked for.
func (p *imagePool) init(templates *imageTemplates, defaultSize int64) {
	p.templates, p.dir = templates, templates.dir
	if defaultSize > 0 {
		p.sizes = []*pooledSize{{size: sizeClass(defaultSize), cutFor: defaultSize, pinned: true}}
	}
}

// take moves a ready image that serves a limit of size to path, cuts its
// ballast back to size and returns it, or nil when there is none (no class
// serving size asked for lately, or the pool has not caught up); either
// way the class it was served from, or would be, is the most recently
// asked for. The caller starts a refill once its Prepare is done:
// measured, a refill started here took a core from the Prepare it was
// serving.
func (p *imagePool) take(ctx context.Context, path string, size int64) *loopImage {
	got, class := p.pop(size)
	if got.img == nil {
		return nil
	}
	// The loop device holds the file open; the rename only names it
	// where the snapshot's directory keeps it.
	err := os.Rename(got.path, path)
	if err == nil {
		// Nobody else reaches the image yet: its mount is detached.
		err = trimBallast(got.img.mnt, class, size)
		if err != nil {
			os.Remove(path)
		}
	} else {
		os.Remove(got.path)
	}
	if err != nil {
		log.G(ctx).WithError(err).WithField("path", got.path).Warn("failed to take a pooled image")
		got.img.close()
		return nil
	}
	return got.img
}

// pop takes a ready image of the smallest pooled class that serves size,
// if any, and moves that class to the front; when no pooled class serving
// size has one ready, the smallest pooled class serving it, or else
// size's own class, goes to the front. A class new to the pool may push
// out the least recently asked for, whose images the refill lets go of:
// unmounting an ext4 costs milliseconds, which are no Prepare's to pay.
func (p *imagePool) pop(size int64) (got pooledImage, class int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return pooledImage{}, 0
	}
	i := -1 // the class to serve from, or to refill
	for j, ps := range p.sizes {
		if !ps.serves(size) {
			continue
		}
		switch {
		case i < 0,
			len(ps.ready) > 0 && len(p.sizes[i].ready) == 0,
			(len(ps.ready) > 0) == (len(p.sizes[i].ready) > 0) && ps.size < p.sizes[i].size:
			i = j
		}
	}
	var ps *pooledSize
	if i >= 0 {
		ps = p.sizes[i]
		p.sizes = slices.Delete(p.sizes, i, i+1)
	} else {
		ps = &pooledSize{size: sizeClass(size)}
		if len(p.sizes) >= poolSizes {
			// The least recently asked for that is not the default's.
			j := len(p.sizes) - 1
			if p.sizes[j].pinned {
				j--
			}
			p.retired = append(p.retired, p.sizes[j].ready...)
			p.sizes = slices.Delete(p.sizes, j, j+1)
		}
	}
	p.sizes = slices.Insert(p.sizes, 0, ps)
	if n := len(ps.ready); n > 0 {
		got, ps.ready = ps.ready[n-1], ps.ready[:n-1]
	}
	return got, ps.size
}

// short is the pooled class asked for most recently that lacks images, or
// nil when every class has poolSize ready.
func (p *imagePool) short() *pooledSize {
	for _, ps := range p.sizes {
		if len(ps.ready) < poolSize {
			return ps
		}
	}
	return nil
}

// refill, in the background, lets go of the images of classes pushed
// out, then makes images until every pooled class has poolSize ready, one
// at a time, the classes asked for most recently first: each a copy of its
// class's template, mounted, its free space taken by a ballast.
func (p *imagePool) refill(ctx context.Context) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.filling || p.closed || (p.short() == nil && len(p.retired) == 0) {
		return
	}
	p.filling = true
	p.fills.Add(1)
	ctx = context.WithoutCancel(ctx)
	go func() {
		defer p.fills.Done()
		stop := func() {
			p.mu.Lock()
			p.filling = false
			p.mu.Unlock()
		}
		if err := os.MkdirAll(p.dir, 0o700); err != nil {
			log.G(ctx).WithError(err).Warn("failed to make the image pool's directory")
			stop()
			return
		}
		for {
			p.mu.Lock()
			retired := p.retired
			p.retired = nil
			p.mu.Unlock()
			release(retired)
			p.mu.Lock()
			var ps *pooledSize
			if !p.closed {
				ps = p.short()
			}
			if ps == nil {
				if len(p.retired) > 0 && !p.closed { // pushed out meanwhile
					p.mu.Unlock()
					continue
				}
				p.filling = false
				p.mu.Unlock()
				return
			}
			p.mu.Unlock()
			// The class's template first (template.go).
			if _, err := p.templates.ensure(ctx, ps.size); err != nil {
				log.G(ctx).WithError(err).WithField("size", ps.size).Warn("failed to make an image template: limited Prepares format their own")
				stop()
				return
			}
			path := filepath.Join(p.dir, "pool-"+strconv.FormatInt(time.Now().UnixNano(), 36)+"-"+strconv.FormatUint(poolSeq.Add(1), 36))
			img, err := makeImage(ctx, p.templates, path, ps.size)
			if err == nil {
				if err = fillBallast(img.mnt, ps.size, ps.cutFor); err != nil {
					img.close()
				}
			}
			if err != nil {
				os.Remove(path)
				log.G(ctx).WithError(err).WithField("size", ps.size).Warn("failed to make a pooled image: limited Prepares make their own")
				stop()
				return
			}
			p.mu.Lock()
			kept := !p.closed && slices.Contains(p.sizes, ps) // not let go of meanwhile
			if kept {
				ps.ready = append(ps.ready, pooledImage{path: path, img: img})
			}
			p.mu.Unlock()
			if !kept {
				img.close()
				os.Remove(path)
			}
		}
	}()
}

// wait returns once no refill is running (tests).
func (p *imagePool) wait() { p.fills.Wait() }

// close stops refilling and lets go of the ready images: their mounts
// dissolve and their loop devices clear.
func (p *imagePool) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.fills.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, ps := range p.sizes {
		release(ps.ready)
	}
	release(p.retired)
	p.sizes, p.retired = nil, nil
}

// release lets go of images: their mounts dissolve and their loop devices
// clear, and their files go.
func release(images []pooledImage) {
	for _, r := range images {
		r.img.close()
		os.Remove(r.path)
	}
}
