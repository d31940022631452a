package fileops

import (
	"fmt"
	"io/fs"
	"strings"

	"golang.org/x/sys/unix"
)

// maxSymlinks is the kernel's MAXSYMLINKS: one path walk follows at most
// 40 symlinks, the 41st gives ELOOP.
const maxSymlinks = 40

// walkToken is one component still to walk; fromLink marks a component
// that came out of a symlink's text rather than the caller's path, which
// a mkdir -p walk must never create.
type walkToken struct {
	name     string
	fromLink bool
}

// walkResult is where a following walk ended.
type walkResult struct {
	e Entry // the entry, when it exists
	// canon is the merged path with every symlink on the way resolved: the
	// entry's path, or where a missing last name would be created.
	canon   string
	missing bool // the last name is absent; its parent exists and is canon's parent
	mustDir bool // the path ended in "/": the entry must be (or become) a directory
	viaLink bool // the missing last name came out of a link's text: the link dangles
}

// mkdirFunc creates the absent directory name in the merged directory
// parent; a mkdir -p walk passes one.
type mkdirFunc func(parent Entry, name string) error

// ResolveFollow returns the entry the merged view shows at path with every
// symlink on the way followed, the last one included, as stat(2) would in
// a process chrooted at the merged root: a relative link text is read from
// the link's directory, an absolute one from the merged root, ".." never
// climbs above that root, and more than 40 links give ELOOP. A link's text
// is itself walked in the merged view, so a link never leads out of the
// layers, and a name found through a link is looked up with the same
// overlay rules as any other. ".." is taken after the link it follows, as
// the kernel does, not cleaned away first. The returned Path is the
// resolved merged path, with no symlink in it.
//
// Resolve, ReadDir, CopyUp and the range operations follow no symlink;
// CopyOut and CopyIn walk their merged path the way ResolveFollow does.
func (s *Stack) ResolveFollow(path string) (Entry, error) {
	v := s.newView()
	defer v.close()
	r, err := v.walk(path, true, nil)
	if err != nil {
		return Entry{}, err
	}
	return r.e, nil
}

// walk resolves a merged path component by component, following symlinks
// in the middle always and a last one when followLast is set (or the path
// ends in "/"). A missing last name is not an error for the walk: it
// returns its canonical place with missing set and an error wrapping
// fs.ErrNotExist. A missing directory on the way is created through mkdir
// when that is given, unless its name came out of a link's text.
func (v *view) walk(p string, followLast bool, mkdir mkdirFunc) (walkResult, error) {
	if strings.IndexByte(p, 0) >= 0 {
		return walkResult{}, fmt.Errorf("path %q: %w", p, ErrInvalidPath)
	}
	root, err := v.resolve("")
	if err != nil {
		return walkResult{}, err
	}
	// frames are the directories walked so far, the root first; ".." pops.
	frames := []Entry{root}
	var r walkResult
	queue := tokens(p, false)
	queue, r.mustDir = trimSlash(queue)
	links := 0
	fail := func(format string, args ...any) (walkResult, error) {
		return walkResult{}, fmt.Errorf("resolve %s: "+format, append([]any{p}, args...)...)
	}
	for len(queue) > 0 {
		t := queue[0]
		queue = queue[1:]
		last := len(queue) == 0
		top := frames[len(frames)-1]
		switch t.name {
		case "", ".":
			continue
		case "..":
			if len(frames) > 1 {
				frames = frames[:len(frames)-1]
			}
			continue
		}
		cur := joinRel(top.Path, t.name)
		f, err := v.lookupIn(top, t.name)
		if err != nil {
			return fail("%w", err)
		}
		if len(f.hits) == 0 {
			if last {
				r.canon, r.missing, r.viaLink = cur, true, t.fromLink
				return r, fmt.Errorf("resolve %s: %s: %w", p, cur, fs.ErrNotExist)
			}
			if mkdir == nil || t.fromLink {
				return fail("%s: %w", cur, fs.ErrNotExist)
			}
			if err := mkdir(top, t.name); err != nil {
				return walkResult{}, err
			}
			// The mkdir copied the directories walked so far up: their
			// layer parts changed.
			for i := range frames {
				if frames[i], err = v.resolve(frames[i].Path); err != nil {
					return fail("%w", err)
				}
			}
			top = frames[len(frames)-1]
			if f, err = v.lookupIn(top, t.name); err != nil {
				return fail("%w", err)
			}
			if len(f.hits) == 0 {
				return fail("%s vanished after mkdir: %w", cur, fs.ErrNotExist)
			}
		}
		e := v.entry(cur, f)
		if e.Kind == KindSymlink && (!last || followLast || r.mustDir) {
			if links++; links > maxSymlinks {
				return fail("more than %d symlinks, at %s in layer %s: %w", maxSymlinks, cur, e.LayerDir, unix.ELOOP)
			}
			body, err := v.readlink(e)
			if err != nil {
				return fail("%w", err)
			}
			if body == "" {
				// The kernel refuses an empty link text.
				return fail("%s in layer %s is a symlink to nothing: %w", cur, e.LayerDir, fs.ErrNotExist)
			}
			if body[0] == '/' {
				frames = frames[:1]
			}
			queue = append(tokens(body, true), queue...)
			var dir bool
			if queue, dir = trimSlash(queue); dir {
				r.mustDir = true
			}
			continue
		}
		if last {
			if r.mustDir && e.Kind != KindDir {
				return fail("%s is a %s in layer %s: %w", cur, e.Kind, e.LayerDir, unix.ENOTDIR)
			}
			r.e, r.canon = e, cur
			return r, nil
		}
		if e.Kind != KindDir {
			return fail("%s is a %s in layer %s: %w", cur, e.Kind, e.LayerDir, unix.ENOTDIR)
		}
		frames = append(frames, e)
	}
	// The path ended in ".", ".." or nothing: it names the directory reached.
	r.e = frames[len(frames)-1]
	r.canon = r.e.Path
	return r, nil
}

// tokens splits a path or a link text into components, empty ones kept
// so that a trailing "/" can be seen.
func tokens(p string, fromLink bool) []walkToken {
	if p == "" {
		return nil
	}
	parts := strings.Split(p, "/")
	out := make([]walkToken, len(parts))
	for i, c := range parts {
		out[i] = walkToken{c, fromLink}
	}
	return out
}

// trimSlash drops empty components at the end: a path that ends in "/"
// must name a directory, through a link if need be.
func trimSlash(q []walkToken) ([]walkToken, bool) {
	trimmed := false
	for len(q) > 1 && q[len(q)-1].name == "" {
		q = q[:len(q)-1]
		trimmed = true
	}
	// Only the slash after a real name counts; "/" alone is the root.
	if len(q) == 1 && q[0].name == "" {
		return nil, false
	}
	return q, trimmed
}

// lookupIn looks one name up in the merged directory dir.
func (v *view) lookupIn(dir Entry, name string) (found, error) {
	dirs, err := v.openDirs(dir.Dirs)
	if err != nil {
		return found{}, err
	}
	defer closeDirs(dirs)
	return v.lookup(dirs, name)
}

// readlink reads the text of a symlink entry from its layer.
func (v *view) readlink(e Entry) (string, error) {
	root, err := v.root(e.Layer)
	if err != nil {
		return "", err
	}
	dir, name := parentName(e.RealPath)
	pfd, err := openBeneath(root, dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return "", fmt.Errorf("open %s in layer %s: %w", dir, e.LayerDir, err)
	}
	defer closeFD(pfd)
	body, err := readlinkAt(pfd, name)
	if err != nil {
		return "", fmt.Errorf("readlink %s in layer %s: %w", e.RealPath, e.LayerDir, err)
	}
	return body, nil
}
