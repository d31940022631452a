package differ

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/fileops"
)

// pair is what a Compare reads: the merged view of the upper mounts and the
// view of the lower mounts, as fileops stacks over the same lower layers.
type pair struct {
	merged *fileops.Stack // upper, lowers...
	lower  *fileops.Stack // lowers...
}

// overlayParts is one overlay mount taken apart.
type overlayParts struct {
	upper     string
	lowers    []string // top first, as lowerdir= lists them
	userxattr bool
}

// parseOverlay reads the layer dirs out of an overlay mount's options.
func parseOverlay(m mount.Mount) (overlayParts, bool) {
	if m.Type != "overlay" {
		return overlayParts{}, false
	}
	var p overlayParts
	for _, o := range m.Options {
		switch {
		case strings.HasPrefix(o, "upperdir="):
			p.upper = strings.TrimPrefix(o, "upperdir=")
		case strings.HasPrefix(o, "lowerdir="):
			p.lowers = strings.Split(strings.TrimPrefix(o, "lowerdir="), ":")
		case o == "userxattr":
			p.userxattr = true
		}
	}
	return p, len(p.lowers) > 0
}

// layersOf names the layer dirs a read-only view shows: a read-only bind of
// one layer, or an overlay of lowers without an upper (p.upper "").
func layersOf(ms []mount.Mount) (p overlayParts, bind, ok bool) {
	if len(ms) != 1 {
		return p, false, false
	}
	m := ms[0]
	if m.Type == "bind" || m.Type == "rbind" {
		ro := false
		for _, o := range m.Options {
			ro = ro || o == "ro"
		}
		return overlayParts{lowers: []string{m.Source}}, true, ro
	}
	p, ok = parseOverlay(m)
	return p, false, ok && p.upper == ""
}

// open checks that lower and upper are mounts overclone handed out for a
// snapshot and a view of its parent, and opens both as stacks. The
// snapshot is an active one (an overlay with an upperdir: its upperdir is
// the layer of changes) or a view of a committed one (an overlay of lowers
// only, whose top lowerdir is the layer of changes and whose other
// lowerdirs are the parent's). Anything else (another snapshotter's
// mounts, a snapshot without parent, a view whose layers are not the
// snapshot's parents, a deep stack the two flattened differently) is
// errdefs.ErrNotImplemented: the diff service then asks its next differ,
// containerd's walking one.
func (d *Differ) open(lower, upper []mount.Mount) (pair, error) {
	if len(upper) != 1 {
		return pair{}, fmt.Errorf("upper is %d mounts, not one overlay: %w", len(upper), errdefs.ErrNotImplemented)
	}
	up, ok := parseOverlay(upper[0])
	if !ok {
		return pair{}, fmt.Errorf("upper is a %s mount, not an overlay: %w", upper[0].Type, errdefs.ErrNotImplemented)
	}
	if up.upper == "" {
		// A view of a committed snapshot: its own layer on top.
		if len(up.lowers) < 2 {
			return pair{}, fmt.Errorf("upper is a view of one layer: %w", errdefs.ErrNotImplemented)
		}
		up.upper, up.lowers = up.lowers[0], up.lowers[1:]
	}
	view, bind, ok := layersOf(lower)
	if !ok {
		return pair{}, fmt.Errorf("lower is not a read-only view of layers: %w", errdefs.ErrNotImplemented)
	}
	// A bind of one layer says nothing of how overlay reads it.
	if (!bind && view.userxattr != up.userxattr) || !sameDirs(view.lowers, up.lowers) {
		return pair{}, fmt.Errorf("lower view's layers are not the upper's lowerdirs: %w", errdefs.ErrNotImplemented)
	}
	upperDir, err := d.layerDir(up.upper)
	if err != nil {
		return pair{}, err
	}
	lowerDirs := make([]string, len(up.lowers))
	for i, dir := range up.lowers {
		if lowerDirs[i], err = d.layerDir(dir); err != nil {
			return pair{}, err
		}
	}
	var opts []fileops.StackOpt
	if up.userxattr {
		opts = append(opts, fileops.WithUserXattr())
	}
	// The stacks are only read: the layer of changes stands as the
	// stack's upper so that fileops reads its whiteouts and redirects
	// as the kernel reads an upperdir's.
	merged, err := fileops.NewStack(upperDir, lowerDirs, opts...)
	if err != nil {
		return pair{}, fmt.Errorf("open upper stack: %w", err)
	}
	lowerStack, err := fileops.NewStack("", lowerDirs, opts...)
	if err != nil {
		return pair{}, fmt.Errorf("open lower stack: %w", err)
	}
	return pair{merged: merged, lower: lowerStack}, nil
}

// layerDir returns the layer dir a mount names, with its links resolved,
// when it is one of overclone's: snapshots/<id>/fs, flat/<id> or the empty
// lower of a layer being unpacked, under the root (short links l/<id>
// resolve to the first). Only overclone's own layers are read: the daemon
// serves whoever reaches its socket, and a Diff call must not become a read
// of any directory on the host, such as a symlink a container left in its
// upper, named as a layer.
func (d *Differ) layerDir(dir string) (string, error) {
	notOurs := func(why string) (string, error) {
		return "", fmt.Errorf("layer %s %s: %w", dir, why, errdefs.ErrNotImplemented)
	}
	if !filepath.IsAbs(dir) {
		return notOurs("is not an absolute path")
	}
	resolved, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return notOurs(fmt.Sprintf("does not resolve (%v)", err))
	}
	rel, err := filepath.Rel(d.realRoot, resolved)
	if err != nil {
		return notOurs("is not under " + d.root)
	}
	parts := strings.Split(rel, string(filepath.Separator))
	switch {
	case len(parts) == 3 && parts[0] == "snapshots" && parts[2] == "fs" && plainName(parts[1]):
	case len(parts) == 2 && parts[0] == "flat" && plainName(parts[1]):
	case len(parts) == 1 && parts[0] == "empty":
	default:
		return notOurs("is not a layer of " + d.root)
	}
	return resolved, nil
}

func plainName(s string) bool {
	return s != "" && s != "." && s != ".."
}

func sameDirs(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if filepath.Clean(a[i]) != filepath.Clean(b[i]) {
			return false
		}
	}
	return true
}
