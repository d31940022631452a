package overlayutil

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// probeAll runs every probe under root, in an order where later probes use
// what earlier ones found (userxattr decides the base options of every
// overlay mount after it).
func probeAll(ctx context.Context, root string) (*Features, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("probe overlay features: make root %s: %w", root, err)
	}
	if err := removeStaleScratch(root); err != nil {
		log.G(ctx).WithError(err).Warn("clean up earlier overlay probes")
	}
	f := &Features{Root: root, KernelRelease: kernelRelease(), BackingFS: fsTypeName(root)}
	p := &prober{ctx: ctx, root: root}

	p.trustedErr = probeTrustedXattr(p)
	ux := p.checkUserXattr()
	if ux.OK {
		p.base = []string{"userxattr"}
	}
	ov := p.checkOverlay()
	f.add(ov)
	f.add(ux)
	if !ov.OK {
		p.broken = "needs an overlay mount, which fails here (see check " + CheckOverlay + ")"
	}

	vol := p.checkVolatile()
	// Unmounting an overlay syncs its whole upper filesystem, which on a
	// busy node's root can take seconds; a volatile overlay skips that, so
	// the writable probes after this one mount volatile where they can.
	p.volatile = vol.OK
	f.add(p.checkMultipleLowers())
	f.add(p.checkIndexOff())
	f.add(p.checkRedirectDir())
	f.add(p.checkMetacopy())
	f.add(vol)
	f.add(p.checkIDMapped())
	f.add(p.checkLowerdirPlus())
	maxc, depth := p.checkMaxLowers()
	f.add(maxc)
	f.maxLowers = depth
	f.add(p.checkReflink())
	f.add(p.checkDedupe())
	f.add(p.checkIntercepts())
	return f, nil
}

// prober carries what the probes share.
type prober struct {
	ctx  context.Context
	root string
	// base are the options every probe mount carries (userxattr when
	// trusted xattrs cannot be written).
	base []string
	// trustedErr is why a trusted.overlay.* xattr could not be written on
	// the backing filesystem, or nil.
	trustedErr error
	// volatile: writable probe mounts add "volatile" (see probeAll).
	volatile bool
	// broken says why overlay does not mount at all; probes that need a
	// mount report it instead of failing for a reason of their own.
	broken string
}

// run gives fn a fresh scratch dir and removes it afterwards; a failure to
// clean up is logged, not fatal, because the answer is already known.
func (p *prober) run(c Check, fn func(s *scratch, c *Check) error) Check {
	s, err := newScratch(p.root)
	if err != nil {
		c.Reason = err.Error()
		return c
	}
	defer func() {
		if err := s.close(); err != nil {
			log.G(p.ctx).WithError(err).WithField("check", c.Name).Warn("clean up overlay probe")
		}
	}()
	if err := fn(s, &c); err != nil {
		c.OK = false
		c.Reason = err.Error()
	}
	return c
}

// needsMount is run for the probes that need a working overlay.
func (p *prober) needsMount(c Check, fn func(s *scratch, c *Check) error) Check {
	if p.broken != "" {
		c.Reason = p.broken
		return c
	}
	return p.run(c, fn)
}

// layers makes lower dirs l0..l(n-1) (l0 the top), upper, work and merged
// in s, and returns the options to mount them with the prober's base
// options first. With upper false the stack is read-only; with upper true
// it is volatile once the volatile probe passed.
func (p *prober) layers(s *scratch, n int, upper bool, extra ...string) ([]string, error) {
	var lowers []string
	for i := range n {
		name := fmt.Sprintf("l%d", i)
		if err := s.mkdirs(name); err != nil {
			return nil, err
		}
		lowers = append(lowers, s.path(name))
	}
	opts := append(append([]string{}, p.base...), extra...)
	if upper {
		if err := s.mkdirs("upper", "work"); err != nil {
			return nil, err
		}
		if p.volatile {
			opts = append(opts, "volatile")
		}
		opts = append(opts, "upperdir="+s.path("upper"), "workdir="+s.path("work"))
	}
	return append(opts, "lowerdir="+strings.Join(lowers, ":")), nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// fsTypeName names the filesystem dir lives on, from its statfs magic.
func fsTypeName(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "unknown"
	}
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlay"
	case unix.NFS_SUPER_MAGIC:
		return "nfs"
	case unix.F2FS_SUPER_MAGIC:
		return "f2fs"
	}
	return fmt.Sprintf("0x%x", st.Type)
}
