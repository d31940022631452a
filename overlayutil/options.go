package overlayutil

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// DefaultMaxLowers is the kernel's OVL_MAX_STACK, the most lower dirs one
// overlay takes ("too many lower directories, limit is 500"). Options use it
// when no probe said otherwise.
const DefaultMaxLowers = 500

var (
	// ErrStackTooDeep: more lowers than the kernel stacks in one mount.
	ErrStackTooDeep = errors.New("overlay stack deeper than the kernel accepts")
	// ErrOptionsTooLong: the option string containerd's core/mount would
	// pass to mount(2), after its lowerdir compaction, exceeds one page.
	ErrOptionsTooLong = errors.New("overlay mount options longer than one page")
)

// FitError says a stack does not fit in one overlay mount, and how many of
// its lowers, counted from the top, do: the snapshotter keeps Fits-1 of
// them and flattens the rest into one layer.
type FitError struct {
	Err    error // ErrStackTooDeep or ErrOptionsTooLong
	Lowers int   // lowers asked for
	Fits   int   // lowers from the top that fit
	Bytes  int   // length of the option string (ErrOptionsTooLong)
	Limit  int   // the kernel's depth or the page's length
}

func (e *FitError) Error() string {
	if errors.Is(e.Err, ErrOptionsTooLong) {
		return fmt.Sprintf("%v: %d lowers need %d bytes of options, limit %d; %d lowers fit", e.Err, e.Lowers, e.Bytes, e.Limit, e.Fits)
	}
	return fmt.Sprintf("%v: %d lowers, limit %d; %d lowers fit", e.Err, e.Lowers, e.Limit, e.Fits)
}

func (e *FitError) Unwrap() error { return e.Err }

// Options shape every overlay mount of one snapshotter. Features.BaseOptions
// fills what the probes decide; the snapshotter adds what its config asks.
type Options struct {
	// IndexOff passes index=off, as containerd does: with the index on, the
	// kernel refuses to mount a lower that another overlay's index holds.
	IndexOff bool
	// UserXattr passes userxattr, for a daemon that cannot write trusted.*
	// xattrs (user namespaces). The kernel then refuses redirect_dir=on.
	UserXattr bool
	// RedirectDir passes redirect_dir=on, so that renaming a lower dir
	// works instead of failing with EXDEV.
	RedirectDir bool
	// Volatile passes volatile on mounts with an upper dir (active
	// snapshots): no syncs, and the upper is unusable after a crash.
	Volatile bool
	// MountOptions from the config are appended verbatim, after ours; an
	// option of ours the config also names is left out.
	MountOptions []string
	// MaxLowers is the kernel's depth limit (Features.MaxLowers); 0 means
	// DefaultMaxLowers.
	MaxLowers int
	// PageSize is the mount(2) data limit's page; 0 means os.Getpagesize.
	PageSize int
}

func (o Options) maxLowers() int {
	if o.MaxLowers > 0 {
		return o.MaxLowers
	}
	return DefaultMaxLowers
}

func (o Options) pageSize() int {
	if o.PageSize > 0 {
		return o.PageSize
	}
	return os.Getpagesize()
}

// OverlayMount builds the mount of a stack: lowers top first (the nearest
// parent first, as overlay's lowerdir= wants), and upper and work for an
// active snapshot or both empty for a read-only view.
//
// Shapes overlay cannot mount are bind mounts, as containerd's overlayfs
// snapshotter returns them: no lowers gives a read-write bind of upper, a
// view of one lower a read-only bind of it.
//
// A stack that does not fit in one mount is a *FitError (errors.Is
// ErrStackTooDeep or ErrOptionsTooLong) saying how many lowers fit.
func OverlayMount(lowers []string, upper, work string, opts Options) (mount.Mount, error) {
	if (upper == "") != (work == "") {
		return mount.Mount{}, fmt.Errorf("overlay mount needs both upper (%q) and work (%q) dirs, or neither", upper, work)
	}
	switch {
	case len(lowers) == 0 && upper == "":
		return mount.Mount{}, errors.New("overlay mount of nothing: no lowers and no upper")
	case len(lowers) == 0:
		return mount.Mount{Type: "bind", Source: upper, Options: []string{"rw", "rbind"}}, nil
	case len(lowers) == 1 && upper == "":
		// overlay refuses a single lower without an upper.
		return mount.Mount{Type: "bind", Source: lowers[0], Options: []string{"ro", "rbind"}}, nil
	}
	for _, p := range append([]string{upper, work}, lowers...) {
		// overlay splits lowerdir on ':' and all options on ','.
		if strings.ContainsAny(p, ":,") {
			return mount.Mount{}, fmt.Errorf("overlay layer path %q contains ':' or ','", p)
		}
	}
	if max := opts.maxLowers(); len(lowers) > max {
		return mount.Mount{}, &FitError{Err: ErrStackTooDeep, Lowers: len(lowers), Fits: FitDepth(lowers, upper, work, opts), Limit: max}
	}
	m := mount.Mount{Type: "overlay", Source: "overlay", Options: overlayOptions(lowers, upper, work, opts)}
	// Options that fit uncompacted fit: compaction only shortens them.
	// Most stacks end here, on the hot path of Prepare and Mounts.
	if summedLen(m.Options)+len(m.Options) <= maxData(opts.pageSize()) {
		return m, nil
	}
	if _, data := MountData(m, opts.pageSize()); len(data) > maxData(opts.pageSize()) {
		return mount.Mount{}, &FitError{Err: ErrOptionsTooLong, Lowers: len(lowers), Fits: FitDepth(lowers, upper, work, opts), Bytes: len(data), Limit: maxData(opts.pageSize())}
	}
	return m, nil
}

// overlayOptions lays out the options: ours, the config's, then work,
// upper and the lowerdir list last. One of ours is left out where the
// config names the same option, so that an operator's choice wins rather
// than meeting a conflicting default.
func overlayOptions(lowers []string, upper, work string, opts Options) []string {
	var o []string
	add := func(want bool, key, opt string) {
		if want && !hasOption(opts.MountOptions, key) {
			o = append(o, opt)
		}
	}
	add(opts.IndexOff, "index", "index=off")
	add(opts.UserXattr, "userxattr", "userxattr")
	add(opts.RedirectDir, "redirect_dir", "redirect_dir=on")
	add(opts.Volatile && upper != "", "volatile", "volatile")
	o = append(o, opts.MountOptions...)
	if upper != "" {
		o = append(o, "workdir="+work, "upperdir="+upper)
	}
	return append(o, "lowerdir="+strings.Join(lowers, ":"))
}

// hasOption reports whether options name key, with or without a value.
func hasOption(options []string, key string) bool {
	for _, o := range options {
		if k, _, _ := strings.Cut(o, "="); k == key {
			return true
		}
	}
	return false
}

// FitDepth returns how many of lowers, counted from the top, fit in one
// overlay mount with upper, work and opts: within the kernel's depth and,
// after containerd's compaction, within one page. Dropping lowers from the
// bottom never lengthens the others' compacted paths, so the answer is
// found by bisection. A snapshotter that gets n < len(lowers) mounts
// lowers[:n-1] plus one layer flattened from lowers[n-1:], whose path must
// be no longer than lowers[n-1]'s.
func FitDepth(lowers []string, upper, work string, opts Options) int {
	fits := func(n int) bool {
		if n > opts.maxLowers() {
			return false
		}
		if n < 2 {
			return true // a bind, or an overlay of one short path
		}
		m := mount.Mount{Type: "overlay", Source: "overlay", Options: overlayOptions(lowers[:n], upper, work, opts)}
		_, data := MountData(m, opts.pageSize())
		return len(data) <= maxData(opts.pageSize())
	}
	lo, hi := 0, len(lowers)+1 // fits(lo), !fits(hi)
	if len(lowers) > 0 {
		lo = 1
	}
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if fits(mid) {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo
}
