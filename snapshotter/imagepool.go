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

// poolSize is how many images of each limit asked for are kept ready.
// CRI starts a pod's sandbox and then its containers one after another,
// and each refill takes a few milliseconds in the background: two cover a
// pod without waiting.
const poolSize = 2

// poolSizes bounds how many classes asked for are pooled at once (each as
// poolSize images): default_max_size's (always) and those most recently
// asked for, the least recently asked for let go first. Each holds
// poolSize loop devices and mounts doing nothing; nodes run pods of a few
// specs at a time.
const poolSizes = 4

// coverClasses are the classes of which the pool keeps one image each
// once limits are in use, so that no limit from MinMaxSize to the largest
// is ever cold: a class serves limits from a quarter of it up
// (classSpan), and every fourth power of two from 128 MiB serves every
// limit from 32 MiB to 128 GiB. Smallest first, the order they are filled
// in.
var coverClasses = []int64{128 << 20, 512 << 20, 2 << 30, 8 << 30, 32 << 30, 128 << 30}

// imagePool keeps images formatted and mounted, detached, with their dirs
// made and their base recorded, so that a limited Prepare only renames
// one into its directory, sets its reserve for the limit (reserve.go) and
// moves its mount: measured, formatting and mounting an image cost a
// Prepare 3-9 ms, the ext4 mount most of it.
//
// The pool holds entries of two kinds, each the ready images of one size
// class:
//   - the classes asked for: default_max_size's from the start and, once
//     a limit is asked for, each of the poolSizes-1 classes most recently
//     asked for, poolSize images each, so that a pod's containers of one
//     limit started one after another find one each;
//   - once limits are in use (default_max_size set, a limited snapshot
//     found at start, or the first limited Prepare), the covers: one
//     image of each of coverClasses, which the LRU never lets go of.
//
// A limit L takes an image of the smallest class serving it (from L to
// classSpan times L) that has one ready: the smallest leaves the
// container the most room. When none has (limits past the largest cover,
// or the refill has not caught up), its Prepare makes its own image at
// exactly L. Either way L's class is then the most recently asked for, and
// the refill makes its images, those asked for first, then the covers,
// smallest first.
//
// The images wait in ROOT/images/pool-*: a daemon that dies leaves the
// files (the kernel dissolves their detached mounts and clears their loop
// devices with the process), and the next start removes them.
type imagePool struct {
	templates *imageTemplates
	dir       string
	// coverClasses is what covers limits once they are in use: those
	// above in a daemon, none where no images are used (the qgroup path)
	// and in tests that do not need them.
	coverClasses []int64

	mu      sync.Mutex
	sizes   []*pooledSize // the limits asked for, most recently first
	covers  []*pooledSize // once limits are in use, smallest first
	retired []pooledImage // of entries let go of, for the refill to release
	filling bool
	closed  bool
	fills   sync.WaitGroup
}

// pooledSize is the ready images of one size class.
type pooledSize struct {
	size   int64 // the class
	keep   int   // how many images to keep ready
	pinned bool  // default_max_size's: never let go
	ready  []pooledImage
}

type pooledImage struct {
	path string
	img  *loopImage
}

var poolSeq atomic.Uint64

// init sets up an empty pool that keeps images of defaultSize's class (0:
// none), of the classes asked for, and once limits are in use (at once
// with a default) of covers.
func (p *imagePool) init(templates *imageTemplates, defaultSize int64, covers []int64) {
	p.templates, p.dir = templates, templates.dir
	p.coverClasses = covers
	if defaultSize > 0 {
		p.sizes = []*pooledSize{{size: sizeClass(defaultSize), keep: poolSize, pinned: true}}
		p.limitsInUse()
	}
}

// limitsInUse makes the pool keep its covers from now on; the caller
// starts a refill when it is done (New does, after recovery).
func (p *imagePool) limitsInUse() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cover()
}

// cover sets the covers up, once; under p.mu.
func (p *imagePool) cover() {
	if p.covers != nil || p.closed {
		return
	}
	for _, c := range p.coverClasses {
		p.covers = append(p.covers, &pooledSize{size: c, keep: 1})
	}
}

// take moves a ready image that serves a limit of size to path, holds it
// to size and returns it, or nil when there is none; either way size's
// class is the most recently asked for. The caller starts a refill once
// its Prepare is done: measured, a refill started here took a core from
// the Prepare it was serving.
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
		err = setLimit(got.img.mnt, class, size, true)
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

// pop takes a ready image of the smallest class serving size, if any, and
// the class it is of; size's class goes to the front of the classes asked
// for, which may push out the least recently asked for but the default's,
// whose images the refill lets go of: unmounting an ext4 costs
// milliseconds, which are no Prepare's to pay. A limit asked for means
// limits are in use: the first sets the covers up.
func (p *imagePool) pop(size int64) (got pooledImage, class int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return pooledImage{}, 0
	}
	p.cover()
	var from *pooledSize
	for _, ps := range slices.Concat(p.sizes, p.covers) {
		if len(ps.ready) == 0 || !serves(ps.size, size) {
			continue
		}
		if from == nil || ps.size < from.size {
			from = ps
		}
	}
	if from != nil {
		n := len(from.ready)
		got, from.ready = from.ready[n-1], from.ready[:n-1]
		class = from.size
	}
	p.ask(sizeClass(size))
	return got, class
}

// ask makes the entry of class the most recently asked for.
func (p *imagePool) ask(class int64) {
	i := slices.IndexFunc(p.sizes, func(ps *pooledSize) bool { return ps.size == class })
	var ps *pooledSize
	if i >= 0 {
		ps = p.sizes[i]
		p.sizes = slices.Delete(p.sizes, i, i+1)
	} else {
		ps = &pooledSize{size: class, keep: poolSize}
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
}

// short is the entry to make an image for next: the class asked for most
// recently that lacks images, else the smallest cover that does; nil when
// every entry has what it keeps.
func (p *imagePool) short() *pooledSize {
	for _, ps := range slices.Concat(p.sizes, p.covers) {
		if len(ps.ready) < ps.keep {
			return ps
		}
	}
	return nil
}

// refill, in the background, lets go of the images of entries pushed
// out, then makes images until every entry has what it keeps, one at a
// time, in short's order: each a copy of its class's template, mounted,
// its dirs and base there already, and primed (primeLimit).
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
				if err = primeLimit(img.mnt); err != nil {
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
			// Not let go of meanwhile (covers never are).
			kept := !p.closed && (slices.Contains(p.sizes, ps) || slices.Contains(p.covers, ps))
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
	for _, ps := range slices.Concat(p.sizes, p.covers) {
		release(ps.ready)
	}
	release(p.retired)
	p.sizes, p.covers, p.retired = nil, nil, nil
}

// release lets go of images: their mounts dissolve and their loop devices
// clear, and their files go.
func release(images []pooledImage) {
	for _, r := range images {
		r.img.close()
		os.Remove(r.path)
	}
}
