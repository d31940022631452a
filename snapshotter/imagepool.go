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

// poolSize is how many images of each pooled size are kept ready. CRI
// starts a pod's sandbox and then its containers one after another, and
// each refill takes a few milliseconds in the background: two cover a
// pod without waiting.
const poolSize = 2

// poolSizes bounds how many sizes are pooled at once: default_max_size
// (always) and the sizes most recently asked for by a label, the least
// recently asked for let go first. Each pooled size holds poolSize loop
// devices and mounts doing nothing; nodes run pods of a few specs at a
// time, and a size asked for once costs no more than without a pool.
const poolSizes = 4

// imagePool keeps images formatted and mounted, detached, with their dirs
// made and their base recorded, so that a limited Prepare only renames one
// into its directory and moves its mount: measured, formatting and
// mounting an image cost a Prepare 3-9 ms, the ext4 mount most of it.
// It pools default_max_size from the start and, once a label asks for it,
// each of the poolSizes-1 sizes asked for most recently, so that the
// second pod of a spec finds its images ready; the first Prepare of a
// size makes its own image in the call.
//
// The images wait in ROOT/images/pool-*: a daemon that dies leaves the
// files (the kernel dissolves their detached mounts and clears their loop
// devices with the process), and the next start removes them.
type imagePool struct {
	pinned    int64 // default_max_size, never let go; 0: none
	templates *imageTemplates
	dir       string

	mu      sync.Mutex
	sizes   []*pooledSize // most recently asked for first
	retired []pooledImage // of sizes let go of, for the refill to release
	filling bool
	closed  bool
	fills   sync.WaitGroup
}

// pooledSize is the ready images of one size.
type pooledSize struct {
	size  int64
	ready []pooledImage
}

type pooledImage struct {
	path string
	img  *loopImage
}

var poolSeq atomic.Uint64

// init sets up an empty pool that keeps images of pinned (0: none) and of
// the sizes asked for.
func (p *imagePool) init(templates *imageTemplates, pinned int64) {
	p.pinned, p.templates, p.dir = pinned, templates, templates.dir
	if pinned > 0 {
		p.sizes = []*pooledSize{{size: pinned}}
	}
}

// take moves a ready image of size to path and returns it, or nil when
// there is none (a size not asked for lately, or one the pool has not
// caught up with); either way it makes size the most recently asked for.
// The caller starts a refill once its Prepare is done: measured, a refill
// started here took a core from the Prepare it was serving.
func (p *imagePool) take(ctx context.Context, path string, size int64) *loopImage {
	got := p.pop(size)
	if got.img == nil {
		return nil
	}
	// The loop device holds the file open; the rename only names it
	// where the snapshot's directory keeps it.
	if err := os.Rename(got.path, path); err != nil {
		log.G(ctx).WithError(err).WithField("path", got.path).Warn("failed to take a pooled image")
		got.img.close()
		os.Remove(got.path)
		return nil
	}
	return got.img
}

// pop takes a ready image of size, if any, and moves size to the front;
// a size new to the pool may push out the least recently asked for, whose
// images the refill lets go of: unmounting an ext4 costs milliseconds,
// which are no Prepare's to pay.
func (p *imagePool) pop(size int64) (got pooledImage) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return pooledImage{}
	}
	i := slices.IndexFunc(p.sizes, func(ps *pooledSize) bool { return ps.size == size })
	var ps *pooledSize
	if i >= 0 {
		ps = p.sizes[i]
		p.sizes = slices.Delete(p.sizes, i, i+1)
	} else {
		ps = &pooledSize{size: size}
		if len(p.sizes) >= poolSizes {
			// The least recently asked for that is not the default.
			j := len(p.sizes) - 1
			if p.sizes[j].size == p.pinned {
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
	return got
}

// short is the pooled size asked for most recently that lacks images, or
// nil when every size has poolSize ready.
func (p *imagePool) short() *pooledSize {
	for _, ps := range p.sizes {
		if len(ps.ready) < poolSize {
			return ps
		}
	}
	return nil
}

// refill, in the background, lets go of the images of sizes pushed out,
// then makes images until every pooled size has poolSize ready, one at a
// time, the sizes asked for most recently first.
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
			// The size's template first: the first Prepare of a size
			// leaves it to this (template.go).
			if _, err := p.templates.ensure(ctx, ps.size); err != nil {
				log.G(ctx).WithError(err).WithField("size", ps.size).Warn("failed to make an image template: limited Prepares format their own")
				stop()
				return
			}
			path := filepath.Join(p.dir, "pool-"+strconv.FormatInt(time.Now().UnixNano(), 36)+"-"+strconv.FormatUint(poolSeq.Add(1), 36))
			img, err := makeImage(ctx, p.templates, path, ps.size)
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
