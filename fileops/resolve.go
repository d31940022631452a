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

func (v *view) rootLocs() []Location {
	locs := make([]Location, len(v.s.layers))
	for i := range locs {
		locs[i] = Location{Layer: i}
	}
	return locs
}

func (v *view) entry(p string, f found) Entry {
	hits, opaque := f.hits, f.opaque
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
	e.DataLayer, e.DataPath = e.Layer, e.RealPath
	if f.data != nil {
		e.Metacopy = true
		e.DataLayer, e.DataPath = f.data.loc.Layer, f.data.loc.Path
	}
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
		return v.entry("", found{hits: hits}), nil
	}
	locs := v.rootLocs()
	comps := splitPath(rel)
	for i, c := range comps {
		dirs, err := v.openDirs(locs)
		if err != nil {
			return Entry{}, fmt.Errorf("resolve %s: %w", rel, err)
		}
		f, err := v.lookup(dirs, c)
		closeDirs(dirs)
		if err != nil {
			return Entry{}, fmt.Errorf("resolve %s: %w", rel, err)
		}
		hits := f.hits
		if len(hits) == 0 {
			return Entry{}, fmt.Errorf("resolve %s: %w", rel, fs.ErrNotExist)
		}
		if i == len(comps)-1 {
			return v.entry(rel, f), nil
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
//
// A name whose lookup fails (a directory with an invalid redirect, or one
// that WithoutRedirects refuses to follow, a metacopy file whose data is
// gone) is listed all the same, as the kernel's readdir lists it: its
// Entry has Err set, Kind KindUnknown and only Path and Info's name
// filled in. Only that entry fails, as only its stat fails on a mount.
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
		p := joinRel(e.Path, n)
		f, err := v.lookup(dirs, n)
		if err != nil {
			// The kernel's readdir lists such a name and only its stat
			// fails; one bad child must not hide its siblings.
			bad := Entry{Path: p, Kind: KindUnknown, Err: fmt.Errorf("read dir /%s: %w", e.Path, err)}
			bad.Info = newInfo(p, &bad.Stat)
			out = append(out, bad)
			continue
		}
		if len(f.hits) == 0 {
			continue
		}
		out = append(out, v.entry(p, f))
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
