package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
)

// poolSize is how many images of the default size are kept ready. CRI
// starts a pod's sandbox and then its containers one after another, and
// each refill takes a few milliseconds in the background: two cover a
// pod without waiting.
const poolSize = 2

// imagePool keeps poolSize images of default_max_size formatted and
// mounted, detached, with their dirs made and their base recorded, so that
// a Prepare with the default limit only renames one into its directory
// and moves its mount: measured, formatting and mounting an image cost a
// Prepare 3-9 ms, the ext4 mount most of it. Labels of other sizes make
// their image in the call.
//
// The images wait in ROOT/images/pool-*: a daemon that dies leaves the
// files (the kernel dissolves their detached mounts and clears their loop
// devices with the process), and the next start removes them.
type imagePool struct {
	size      int64 // 0: no pool
	templates *imageTemplates
	dir       string

	mu      sync.Mutex
	ready   []pooledImage
	filling bool
	closed  bool
	fills   sync.WaitGroup
}

type pooledImage struct {
	path string
	img  *loopImage
}

var poolSeq atomic.Uint64

// take moves a ready image of size to path and returns it, or nil when
// there is none (another size, or the pool ran dry); it starts a refill.
func (p *imagePool) take(ctx context.Context, path string, size int64) *loopImage {
	if p.size == 0 || size != p.size {
		return nil
	}
	p.mu.Lock()
	var got pooledImage
	if n := len(p.ready); n > 0 {
		got, p.ready = p.ready[n-1], p.ready[:n-1]
	}
	p.mu.Unlock()
	p.refill(ctx)
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

// refill makes images in the background until poolSize are ready.
func (p *imagePool) refill(ctx context.Context) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.size == 0 || p.filling || p.closed || len(p.ready) >= poolSize {
		return
	}
	p.filling = true
	p.fills.Add(1)
	ctx = context.WithoutCancel(ctx)
	go func() {
		defer p.fills.Done()
		if err := os.MkdirAll(p.dir, 0o700); err != nil {
			log.G(ctx).WithError(err).Warn("failed to make the image pool's directory")
			p.mu.Lock()
			p.filling = false
			p.mu.Unlock()
			return
		}
		for {
			p.mu.Lock()
			if p.closed || len(p.ready) >= poolSize {
				p.filling = false
				p.mu.Unlock()
				return
			}
			p.mu.Unlock()
			path := filepath.Join(p.dir, "pool-"+strconv.FormatInt(time.Now().UnixNano(), 36)+"-"+strconv.FormatUint(poolSeq.Add(1), 36))
			img, err := makeImage(ctx, p.templates, path, p.size)
			if err != nil {
				os.Remove(path)
				log.G(ctx).WithError(err).Warn("failed to make a pooled image: Prepares with the default limit make their own")
				p.mu.Lock()
				p.filling = false
				p.mu.Unlock()
				return
			}
			p.mu.Lock()
			p.ready = append(p.ready, pooledImage{path: path, img: img})
			p.mu.Unlock()
		}
	}()
}

// close stops refilling and lets go of the ready images: their mounts
// dissolve and their loop devices clear.
func (p *imagePool) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.fills.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.ready {
		r.img.close()
		os.Remove(r.path)
	}
	p.ready = nil
}
