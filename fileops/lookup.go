package fileops

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

type hit struct {
	loc Location
	st  unix.Stat_t
}

// found is the result of one lookup: the layer parts of the entry, top
// first, and for a metacopy file the layer holding its data.
type found struct {
	hits   []hit
	opaque bool
	data   *hit
}

// lookup finds name in a merged directory, given that directory's layer
// parts top first, following overlayfs' per-component rules: a whiteout
// ends the search; a non-directory is opaque and never merges with a
// directory above or below it; an opaque directory ends merging; a
// redirect renames the lookup in the layers below (a relative one within
// the same parent, an absolute one from each lower root); a metacopy file
// takes its data from the next regular file below.
func (v *view) lookup(dirs []dirRef, name string) (found, error) {
	var f found
	metacopy := false
	rel := name   // the name looked up in the parents' layer dirs
	abs := ""     // after an absolute redirect: the path below each root
	absFrom := -1 // the next layer an absolute lookup visits
	next := 0     // the next parent layer dir
	last := len(v.s.layers) - 1
	for {
		var (
			st    unix.Stat_t
			state probeState
			loc   Location
			pfd   = -1
			pname string
			stop  bool
			err   error
		)
		if abs == "" {
			if next >= len(dirs) {
				break
			}
			d := dirs[next]
			next++
			st, state, err = v.probe(d.fd, rel)
			loc = Location{d.loc.Layer, joinRel(d.loc.Path, rel)}
			pfd, pname = d.fd, rel
		} else {
			if absFrom > last {
				break
			}
			loc = Location{absFrom, abs}
			absFrom++
			var own int
			st, state, own, abs, stop, err = v.probeAbs(loc.Layer, abs)
			defer closeFD(own)
			_, pname = parentName(loc.Path)
			pfd = own
		}
		if err != nil {
			return found{}, fmt.Errorf("look up %s in layer %s: %w", loc.Path, v.s.layers[loc.Layer], err)
		}
		if state == absent {
			if stop {
				break
			}
			continue
		}
		if state == whitedOut {
			break
		}
		isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
		isReg := st.Mode&unix.S_IFMT == unix.S_IFREG
		if metacopy {
			if !isReg {
				break
			}
			mc, err := v.isMetacopy(pfd, pname)
			if err != nil {
				return found{}, fmt.Errorf("look up %s in layer %s: %w", loc.Path, v.s.layers[loc.Layer], err)
			}
			if !mc {
				f.data = &hit{loc, st}
				break
			}
			// Another metacopy file on the way to the data: it may have
			// been renamed in its own layer, and then its redirect says
			// where the lookup goes on (a file chmod'ed, renamed, then
			// chmod'ed and renamed again in a later layer; the kernel
			// follows the chain, measured on 6.18).
		} else if !isDir {
			if len(f.hits) > 0 {
				break
			}
			f.hits = append(f.hits, hit{loc, st})
			if !isReg || loc.Layer == last || v.s.cfg.userXattr {
				break
			}
			mc, err := v.isMetacopy(pfd, pname)
			if err != nil {
				return found{}, fmt.Errorf("look up %s in layer %s: %w", loc.Path, v.s.layers[loc.Layer], err)
			}
			if !mc {
				break
			}
			metacopy = true
		} else {
			f.hits = append(f.hits, hit{loc, st})
			if loc.Layer == last || stop {
				break
			}
		}
		opq, redirect, err := v.dirMeta(pfd, pname)
		if err != nil {
			return found{}, fmt.Errorf("look up %s in layer %s: %w", loc.Path, v.s.layers[loc.Layer], err)
		}
		if opq && isDir {
			f.opaque = f.opaque || len(f.hits) == 1
			break
		}
		if redirect == "" {
			continue
		}
		// The kernel checks the redirect before it decides whether to
		// follow it: an invalid one fails with EINVAL even under
		// redirect_dir=nofollow (measured on 6.18).
		r, err := validRedirect(redirect)
		if err != nil {
			return found{}, fmt.Errorf("look up %s in layer %s: %w", loc.Path, v.s.layers[loc.Layer], err)
		}
		if v.s.cfg.noRedirect {
			// redirect_dir=nofollow (and userxattr, which implies it): the
			// kernel refuses the lookup rather than show a merge that the
			// redirect says is wrong (measured: EPERM).
			return found{}, fmt.Errorf("look up %s in layer %s: refusing to follow redirect %q: %w", loc.Path, v.s.layers[loc.Layer], redirect, unix.EPERM)
		}
		switch {
		case r[0] == '/':
			abs, absFrom = r[1:], loc.Layer+1
		case abs != "":
			dir, _ := parentName(abs)
			abs = joinRel(dir, r)
		default:
			rel = r
		}
	}
	if metacopy && f.data == nil {
		// The kernel fails such a lookup too: the data is gone.
		h := f.hits[0]
		return found{}, fmt.Errorf("look up %s in layer %s: metacopy file without data below: %w", h.loc.Path, v.s.layers[h.loc.Layer], unix.EIO)
	}
	return f, nil
}

// probeAbs looks an absolute redirect target up below one layer root,
// component by component: a whiteout or non-directory on the way ends the
// whole lookup, an opaque directory on the way ends it after this layer.
// It returns the open parent of the last component for dirMeta, and the
// path the layers below look up: a directory on the way that was itself
// renamed in this layer (it has a redirect) renames the rest of the path
// below, as the kernel's ovl_lookup_layer does (a file renamed into a
// renamed directory, measured on 6.18); an absolute one also undoes an
// opaque directory met before it.
func (v *view) probeAbs(layer int, abs string) (st unix.Stat_t, state probeState, pfd int, next string, stop bool, err error) {
	next = abs
	r, err := v.root(layer)
	if err != nil {
		return st, absent, -1, next, false, err
	}
	comps := splitPath(abs)
	cur, err := unix.Dup(r)
	if err != nil {
		return st, absent, -1, next, false, err
	}
	var name []string // the components of next before the current one
	for i, c := range comps {
		rest := func() []string { return append(append([]string(nil), name...), comps[i:]...) }
		st, state, err = v.probe(cur, c)
		if err != nil || state == absent {
			closeFD(cur)
			return st, absent, -1, strings.Join(rest(), "/"), false, err
		}
		if state == whitedOut {
			closeFD(cur)
			return st, absent, -1, strings.Join(rest(), "/"), true, nil
		}
		if i == len(comps)-1 {
			return st, present, cur, strings.Join(rest(), "/"), stop, nil
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			closeFD(cur)
			return st, absent, -1, strings.Join(rest(), "/"), true, nil
		}
		opq, redirect, err := v.dirMeta(cur, c)
		if err != nil {
			closeFD(cur)
			return st, absent, -1, next, false, err
		}
		stop = stop || opq
		switch red, rerr := validRedirect(redirect); {
		case redirect == "":
			name = append(name, c)
		case rerr != nil:
			closeFD(cur)
			return st, absent, -1, next, false, fmt.Errorf("look up %s in layer %s: %w", joinRel(strings.Join(comps[:i], "/"), c), v.s.layers[layer], rerr)
		case red[0] == '/':
			name = splitPath(red[1:])
			stop = false
		default:
			name = append(name, red)
		}
		child, err := openBeneath(cur, c, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		closeFD(cur)
		if err != nil {
			return st, absent, -1, next, false, err
		}
		cur = child
	}
	// An empty absolute redirect ("/") names the root itself.
	if err := unix.Fstat(cur, &st); err != nil {
		closeFD(cur)
		return st, absent, -1, next, false, err
	}
	return st, present, cur, next, stop, nil
}
