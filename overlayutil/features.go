package overlayutil

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/containerd/log"
)

// Names of the checks, as printed by `overclone check` and logged at start.
const (
	CheckOverlay         = "overlay"
	CheckMultipleLowers  = "multiple-lowers"
	CheckIndexOff        = "index-off"
	CheckRedirectDir     = "redirect-dir"
	CheckMetacopy        = "metacopy"
	CheckVolatile        = "volatile"
	CheckUserXattrNeeded = "userxattr-needed"
	CheckIDMapped        = "idmapped-mounts"
	CheckLowerdirPlus    = "lowerdir-plus"
	CheckMaxLowers       = "max-lowers"
	CheckReflink         = "reflink"
	CheckIntercepts      = "intercepts-file-ops"
)

// Check is the outcome of one probe. OK is the answer to the question the
// check's name asks; Reason says why it is false (or, for a check that
// passed, anything an operator should still know).
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Value  string `json:"value,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// Features is what the kernel's overlayfs can do on the filesystem holding
// Root, as found by Probe.
type Features struct {
	Root          string  `json:"root"`
	KernelRelease string  `json:"kernel_release"`
	BackingFS     string  `json:"backing_fs"`
	Checks        []Check `json:"checks"`

	maxLowers int
}

// Get returns the check called name, or a failed check saying it was not run.
func (f *Features) Get(name string) Check {
	for _, c := range f.Checks {
		if c.Name == name {
			return c
		}
	}
	return Check{Name: name, Reason: "not probed"}
}

// OK reports whether the check called name passed.
func (f *Features) OK(name string) bool { return f.Get(name).OK }

// CanServe reports whether overlayfs can serve snapshots under Root at all:
// it mounts, and it stacks more than one lower directory (every image with a
// parent layer needs that).
func (f *Features) CanServe() bool {
	return f.OK(CheckOverlay) && f.OK(CheckMultipleLowers)
}

// Intercepts reports whether copy_file_range, FICLONE and read on a merged
// file never return a lower layer's bytes after the file was copied up. See
// probeIntercepts for what is and is not counted.
func (f *Features) Intercepts() bool { return f.OK(CheckIntercepts) }

// MaxLowers is the deepest stack of lower directories the kernel accepted in
// one mount, or 0 when overlay does not mount at all.
func (f *Features) MaxLowers() int { return f.maxLowers }

// BaseOptions returns the mount options the probes say every overlay mount
// under Root should carry: index=off where accepted (as containerd does, so
// that a layer can be mounted by several overlays at once), userxattr where
// trusted xattrs cannot be written, redirect_dir=on where renaming a lower
// dir works with it (containerd's suite renames one), and the kernel's
// depth limit. Volatile and the config's options are the caller's to add.
func (f *Features) BaseOptions() Options {
	return Options{
		IndexOff:    f.OK(CheckIndexOff),
		UserXattr:   f.OK(CheckUserXattrNeeded),
		RedirectDir: f.OK(CheckRedirectDir),
		MaxLowers:   f.maxLowers,
	}
}

// Log writes the findings to the context's logger: one info line per check,
// and a warning for what an operator must act on.
func (f *Features) Log(ctx context.Context) {
	l := log.G(ctx).WithField("root", f.Root)
	l.WithField("kernel", f.KernelRelease).WithField("backing_fs", f.BackingFS).Info("overlay feature probe")
	for _, c := range f.Checks {
		e := l.WithField("check", c.Name).WithField("ok", c.OK)
		if c.Value != "" {
			e = e.WithField("value", c.Value)
		}
		if c.Reason != "" {
			e = e.WithField("reason", c.Reason)
		}
		e.Info("overlay feature")
	}
	if !f.CanServe() {
		reason := f.Get(CheckOverlay).Reason
		if f.OK(CheckOverlay) {
			reason = f.Get(CheckMultipleLowers).Reason
		}
		l.WithField("reason", reason).Warn("overlayfs cannot serve snapshots under this root")
	}
	if f.CanServe() && !f.Intercepts() {
		l.Warn("overlayfs may return a lower layer's bytes to copy_file_range or FICLONE after copy-up")
	}
}

func (f *Features) add(c Check) { f.Checks = append(f.Checks, c) }

func (f *Features) String() string {
	return fmt.Sprintf("overlay features of %s (%s on kernel %s): serve=%t max-lowers=%d",
		f.Root, f.BackingFS, f.KernelRelease, f.CanServe(), f.maxLowers)
}

// cache holds one Features per root: probing mounts and unmounts a few dozen
// times, and the answers do not change while the kernel and the filesystem
// under the root stay the same.
var cache struct {
	sync.Mutex
	byRoot map[string]*Features
}

// Probe returns the features of overlayfs on the filesystem holding root,
// probing once per root and process. Root is created if missing. The error
// is for what stops probing (root cannot be created); a feature the kernel
// lacks is a failed Check, not an error.
func Probe(ctx context.Context, root string) (*Features, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("probe overlay features under %s: %w", root, err)
	}
	cache.Lock()
	defer cache.Unlock()
	if f, ok := cache.byRoot[abs]; ok {
		return f, nil
	}
	f, err := probeAll(ctx, abs)
	if err != nil {
		return nil, err
	}
	if cache.byRoot == nil {
		cache.byRoot = make(map[string]*Features)
	}
	cache.byRoot[abs] = f
	return f, nil
}

// Forget drops the cached features of root, so that the next Probe runs the
// probes again (after the filesystem under root was replaced, say).
func Forget(root string) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return
	}
	cache.Lock()
	delete(cache.byRoot, abs)
	cache.Unlock()
}
