package fileops

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrReadOnly is returned when a write is asked of a stack without upper.
var ErrReadOnly = errors.New("stack has no upper layer")

// Stack is a set of overlay layer directories, top first, as overlayfs
// would mount them: an optional writable upper above read-only lowers.
// Layer index 0 is the upper when there is one, else the topmost lower.
//
// A Stack holds no open descriptors between calls, so layers can be
// unmounted or removed once the caller is done with it.
type Stack struct {
	layers   []string
	hasUpper bool
	cfg      config

	// mu serializes writes into the upper so that two copy-ups of the same
	// parent cannot race each other into EEXIST.
	mu sync.Mutex
	// links remembers lower inodes already copied up, so that hard links
	// inside one layer stay linked in the upper (the kernel needs index=on
	// for this; fileops keeps the map for the life of the Stack).
	links map[inodeKey]upperLink
}

type inodeKey struct {
	layer int
	dev   uint64
	ino   uint64
}

type upperLink struct {
	rel string
	ino uint64
}

type config struct {
	verbatim     bool
	userXattr    bool
	tarWhiteouts bool
	noRedirect   bool
	workDir      string
	volatile     bool
	methods      []Method
}

// StackOpt configures a Stack.
type StackOpt func(*config) error

// WithUserXattr reads and writes overlay metadata in the user.overlay.*
// namespace, as overlayfs does when mounted with userxattr. Like the
// kernel in that mode, it does not follow redirects (see WithoutRedirects)
// and ignores metacopy.
func WithUserXattr() StackOpt {
	return func(c *config) error { c.userXattr = true; c.noRedirect = true; return nil }
}

// WithVerbatim reads the layers as plain directories: no whiteouts, no
// opaque or redirected directories, and every xattr is data, overlay's
// included. A snapshot stored whole (overclone's userspace mode) is such a
// directory: a 0/0 device or a trusted.overlay.* xattr a container made in
// it is content, and a copy of it must carry it, not act on it.
func WithVerbatim() StackOpt {
	return func(c *config) error { c.verbatim = true; c.noRedirect = true; return nil }
}

// WithTarWhiteouts also honours OCI image-layer whiteouts: a ".wh.NAME"
// entry hides NAME in the layers below and ".wh..wh..opq" makes its
// directory opaque. Names starting with ".wh." are then never visible.
func WithTarWhiteouts() StackOpt {
	return func(c *config) error { c.tarWhiteouts = true; return nil }
}

// WithoutRedirects does not follow overlay.redirect, as a mount with
// redirect_dir=nofollow: like the kernel, a lookup that meets a redirect
// on a directory above the bottom layer fails with EPERM.
func WithoutRedirects() StackOpt {
	return func(c *config) error { c.noRedirect = true; return nil }
}

// WithWorkDir stages every copy-up in dir, which must be on the upper's
// filesystem, and renames the finished entry into place, as overlayfs does
// with its workdir. Without it regular files are staged with O_TMPFILE and
// other entries under a temporary name next to their final one.
func WithWorkDir(dir string) StackOpt {
	return func(c *config) error { c.workDir = dir; return nil }
}

// WithVolatile skips the fsync before a copied-up file is linked in, like
// overlayfs' volatile option: faster, but a power cut may leave a file
// whose data did not reach the disk.
func WithVolatile() StackOpt {
	return func(c *config) error { c.volatile = true; return nil }
}

// WithDataMethods limits the ways file data is copied, in order of
// preference. Tests and benchmarks use it to force one method.
func WithDataMethods(ms ...Method) StackOpt {
	return func(c *config) error {
		for _, m := range ms {
			if m != MethodReflink && m != MethodCopyFileRange && m != MethodReadWrite {
				return fmt.Errorf("data method %v cannot copy file data: %w", m, os.ErrInvalid)
			}
		}
		c.methods = ms
		return nil
	}
}

// NewStack checks the layers and returns a Stack. upper may be "" for a
// read-only stack; lowers are top first, nearest parent first, as in
// overlayfs' lowerdir option.
func NewStack(upper string, lowers []string, opts ...StackOpt) (*Stack, error) {
	s := &Stack{links: map[inodeKey]upperLink{}}
	s.cfg.methods = []Method{MethodReflink, MethodCopyFileRange, MethodReadWrite}
	for _, o := range opts {
		if err := o(&s.cfg); err != nil {
			return nil, err
		}
	}
	if s.cfg.verbatim {
		s.cfg.tarWhiteouts = false // plain directories have no whiteouts of any form
	}
	if upper != "" {
		s.layers = append(s.layers, upper)
		s.hasUpper = true
	}
	s.layers = append(s.layers, lowers...)
	if len(s.layers) == 0 {
		return nil, fmt.Errorf("new stack: no layers: %w", os.ErrInvalid)
	}
	for _, l := range s.layers {
		if err := checkLayerDir(l); err != nil {
			return nil, err
		}
	}
	if s.cfg.workDir != "" {
		if !s.hasUpper {
			return nil, fmt.Errorf("work dir %s without an upper layer: %w", s.cfg.workDir, os.ErrInvalid)
		}
		if err := checkLayerDir(s.cfg.workDir); err != nil {
			return nil, err
		}
		var a, b unix.Stat_t
		if err := unix.Stat(upper, &a); err != nil {
			return nil, fmt.Errorf("stat upper %s: %w", upper, err)
		}
		if err := unix.Stat(s.cfg.workDir, &b); err != nil {
			return nil, fmt.Errorf("stat work dir %s: %w", s.cfg.workDir, err)
		}
		// rename(2) cannot cross filesystems, and staging must end in one.
		if a.Dev != b.Dev {
			return nil, fmt.Errorf("work dir %s is not on the filesystem of upper %s: %w", s.cfg.workDir, upper, unix.EXDEV)
		}
	}
	return s, nil
}

func checkLayerDir(dir string) error {
	if dir == "" {
		return fmt.Errorf("layer with empty path: %w", os.ErrInvalid)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("layer %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("layer %s is not a directory: %w", dir, unix.ENOTDIR)
	}
	return nil
}

// Layers returns the layer directories, top first (the upper, if any, first).
func (s *Stack) Layers() []string { return append([]string(nil), s.layers...) }

// Upper returns the upper layer directory, or "" for a read-only stack.
func (s *Stack) Upper() string {
	if !s.hasUpper {
		return ""
	}
	return s.layers[0]
}

// prefix is the xattr namespace of overlay metadata.
func (s *Stack) prefix() string {
	if s.cfg.userXattr {
		return "user.overlay."
	}
	return "trusted.overlay."
}

// isPrivateXattr reports overlay metadata that a copy must not carry: the
// kernel's own bookkeeping (opaque, redirect, origin, ...). Since Linux 6.7
// a user's own "trusted.overlay.X" is stored escaped as
// "trusted.overlay.overlay.X"; that one is data and is kept.
func (s *Stack) isPrivateXattr(name string) bool {
	if s.cfg.verbatim {
		return false
	}
	p := s.prefix()
	if len(name) < len(p) || name[:len(p)] != p {
		return false
	}
	esc := p + "overlay."
	return !(len(name) > len(esc) && name[:len(esc)] == esc)
}
