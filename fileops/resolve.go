package fileops

import (
	"fmt"
	"io/fs"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// view holds what one call needs open: the layer roots, opened lazily and
// closed when the call returns.
type view struct {
	s     *Stack
	roots []int
}

func (s *Stack) newView() *view {
	v := &view{s: s, roots: make([]int, len(s.layers))}
	for i := range v.roots {
		v.roots[i] = -1
	}
	return v
}

func (v *view) close() {
	for i, fd := range v.roots {
		closeFD(fd)
		v.roots[i] = -1
	}
}

func (v *view) root(layer int) (int, error) {
	if v.roots[layer] >= 0 {
		return v.roots[layer], nil
	}
	fd, err := openDir(v.s.layers[layer])
	if err != nil {
		return -1, fmt.Errorf("open layer %s: %w", v.s.layers[layer], err)
	}
	v.roots[layer] = fd
	return fd, nil
}

// dirRef is one layer's part of a merged directory, open for lookups.
type dirRef struct {
	loc Location
	fd  int
}

func (v *view) openDirs(locs []Location) ([]dirRef, error) {
	out := make([]dirRef, 0, len(locs))
	for _, l := range locs {
		r, err := v.root(l.Layer)
		if err != nil {
			closeDirs(out)
			return nil, err
		}
		fd, err := openBeneath(r, l.Path, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			closeDirs(out)
			return nil, fmt.Errorf("open %s in layer %s: %w", l.Path, v.s.layers[l.Layer], err)
		}
		out = append(out, dirRef{l, fd})
	}
	return out, nil
}

func closeDirs(ds []dirRef) {
	for _, d := range ds {
		closeFD(d.fd)
	}
}

type hit struct {
	loc Location
	st  unix.Stat_t
}

// lookup finds name in a merged directory, given that directory's layer
// parts top first, following overlayfs' per-component rules: a whiteout
// ends the search; a non-directory is opaque and never merges with a
// directory above or below it; an opaque directory ends merging; a
// redirect renames the lookup in the layers below (a relative one within
// the same parent, an absolute one from each lower root).
func (v *view) lookup(dirs []dirRef, name string) ([]hit, bool, error) {
	var hits []hit
	opaque := false
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
			st, state, own, stop, err = v.probeAbs(loc.Layer, abs)
			defer closeFD(own)
			_, pname = parentName(abs)
			pfd = own
		}
		if err != nil {
			return nil, false, fmt.Errorf("look up %s in layer %s: %w", loc.Path, v.s.layers[loc.Layer], err)
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
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			if len(hits) == 0 {
				hits = append(hits, hit{loc, st})
			}
			break
		}
		hits = append(hits, hit{loc, st})
		if loc.Layer == last || stop {
			break
		}
		opq, redirect, err := v.dirMeta(pfd, pname)
		if err != nil {
			return nil, false, fmt.Errorf("look up %s in layer %s: %w", loc.Path, v.s.layers[loc.Layer], err)
		}
		if opq {
			opaque = opaque || len(hits) == 1
			break
		}
		if redirect == "" {
			continue
		}
		r, err := validRedirect(redirect)
		if err != nil {
			return nil, false, fmt.Errorf("look up %s in layer %s: %w", loc.Path, v.s.layers[loc.Layer], err)
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
	return hits, opaque, nil
}

// probeAbs looks an absolute redirect target up below one layer root,
// component by component: a whiteout or non-directory on the way ends the
// whole lookup, an opaque directory on the way ends it after this layer.
// It returns the open parent of the last component for dirMeta.
func (v *view) probeAbs(layer int, abs string) (st unix.Stat_t, state probeState, pfd int, stop bool, err error) {
	r, err := v.root(layer)
	if err != nil {
		return st, absent, -1, false, err
	}
	comps := splitPath(abs)
	cur, err := unix.Dup(r)
	if err != nil {
		return st, absent, -1, false, err
	}
	for i, c := range comps {
		st, state, err = v.probe(cur, c)
		if err != nil || state == absent {
			closeFD(cur)
			return st, absent, -1, false, err
		}
		if state == whitedOut {
			closeFD(cur)
			return st, absent, -1, true, nil
		}
		if i == len(comps)-1 {
			return st, present, cur, stop, nil
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			closeFD(cur)
			return st, absent, -1, true, nil
		}
		opq, _, err := v.dirMeta(cur, c)
		if err != nil {
			closeFD(cur)
			return st, absent, -1, false, err
		}
		stop = stop || opq
		child, err := openBeneath(cur, c, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		closeFD(cur)
		if err != nil {
			return st, absent, -1, false, err
		}
		cur = child
	}
	// An empty absolute redirect ("/") names the root itself.
	if err := unix.Fstat(cur, &st); err != nil {
		closeFD(cur)
		return st, absent, -1, false, err
	}
	return st, present, cur, stop, nil
}

func (v *view) rootLocs() []Location {
	locs := make([]Location, len(v.s.layers))
	for i := range locs {
		locs[i] = Location{Layer: i}
	}
	return locs
}

func (v *view) entry(p string, hits []hit, opaque bool) Entry {
	h := hits[0]
	e := Entry{
		Path:     p,
		Layer:    h.loc.Layer,
		LayerDir: v.s.layers[h.loc.Layer],
		RealPath: h.loc.Path,
		Kind:     kindOf(h.st.Mode),
		Stat:     h.st,
		Opaque:   opaque,
	}
	e.Info = newInfo(p, &e.Stat)
	if e.Kind == KindDir {
		for _, x := range hits {
			e.Dirs = append(e.Dirs, x.loc)
		}
	}
	return e
}

// resolve walks a cleaned path one component at a time from the roots.
func (v *view) resolve(rel string) (Entry, error) {
	if rel == "" {
		r, err := v.root(0)
		if err != nil {
			return Entry{}, err
		}
		var st unix.Stat_t
		if err := unix.Fstat(r, &st); err != nil {
			return Entry{}, fmt.Errorf("stat layer %s: %w", v.s.layers[0], err)
		}
		hits := make([]hit, len(v.s.layers))
		for i, l := range v.rootLocs() {
			hits[i] = hit{loc: l, st: st}
		}
		return v.entry("", hits, false), nil
	}
	locs := v.rootLocs()
	comps := splitPath(rel)
	for i, c := range comps {
		dirs, err := v.openDirs(locs)
		if err != nil {
			return Entry{}, fmt.Errorf("resolve %s: %w", rel, err)
		}
		hits, opaque, err := v.lookup(dirs, c)
		closeDirs(dirs)
		if err != nil {
			return Entry{}, fmt.Errorf("resolve %s: %w", rel, err)
		}
		if len(hits) == 0 {
			return Entry{}, fmt.Errorf("resolve %s: %w", rel, fs.ErrNotExist)
		}
		if i == len(comps)-1 {
			return v.entry(rel, hits, opaque), nil
		}
		if hits[0].st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return Entry{}, fmt.Errorf("resolve %s: %s is a %s in layer %s: %w", rel, joinRel("", hits[0].loc.Path),
				kindOf(hits[0].st.Mode), v.s.layers[hits[0].loc.Layer], unix.ENOTDIR)
		}
		locs = locs[:0:0]
		for _, h := range hits {
			locs = append(locs, h.loc)
		}
	}
	panic("unreachable")
}

// Resolve returns the entry the merged view shows at path. A name that is
// absent or hidden (whited out, below an opaque directory, below a
// non-directory) gives an error wrapping fs.ErrNotExist.
func (s *Stack) Resolve(path string) (Entry, error) {
	rel, err := cleanPath(path)
	if err != nil {
		return Entry{}, err
	}
	v := s.newView()
	defer v.close()
	return v.resolve(rel)
}

// ReadDir returns the merged listing of the directory at path, sorted by
// name, without whiteouts and without the names they hide.
func (s *Stack) ReadDir(path string) ([]Entry, error) {
	rel, err := cleanPath(path)
	if err != nil {
		return nil, err
	}
	v := s.newView()
	defer v.close()
	e, err := v.resolve(rel)
	if err != nil {
		return nil, err
	}
	return v.readDir(e)
}

func (v *view) readDir(e Entry) ([]Entry, error) {
	if e.Kind != KindDir {
		return nil, fmt.Errorf("read dir %s in layer %s: %w", e.Path, e.LayerDir, unix.ENOTDIR)
	}
	dirs, err := v.openDirs(e.Dirs)
	if err != nil {
		return nil, fmt.Errorf("read dir %s: %w", e.Path, err)
	}
	defer closeDirs(dirs)
	seen := map[string]struct{}{}
	for _, d := range dirs {
		names, err := readNames(d.fd)
		if err != nil {
			return nil, fmt.Errorf("read dir %s in layer %s: %w", d.loc.Path, v.s.layers[d.loc.Layer], err)
		}
		for _, n := range names {
			seen[n] = struct{}{}
		}
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	sort.Strings(names)
	out := make([]Entry, 0, len(names))
	for _, n := range names {
		hits, opaque, err := v.lookup(dirs, n)
		if err != nil {
			return nil, fmt.Errorf("read dir %s: %w", e.Path, err)
		}
		if len(hits) == 0 {
			continue
		}
		out = append(out, v.entry(joinRel(e.Path, n), hits, opaque))
	}
	return out, nil
}

// readNames lists one real directory given an O_PATH handle to it.
func readNames(dirfd int) ([]string, error) {
	fd, err := unix.Openat(dirfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "dir")
	defer f.Close()
	return f.Readdirnames(-1)
}
