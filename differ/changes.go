package differ

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"path"
	"sort"

	"github.com/containerd/continuity/fs"

	"github.com/overclone/overclone/fileops"
)

// changeFunc receives the changes in the order the walking differ finds
// them: depth first, names sorted, a directory before its children. e is
// the merged entry (zero for a delete).
type changeFunc func(k fs.ChangeKind, p string, e fileops.Entry) error

// changes finds what the upper changed relative to the lower view, the
// changes containerd's walking differ (continuity's fs.Changes over both
// mounted trees) would report, by reading only where the upper can have
// changed something: a merged directory is listed only when the upper has
// a part of it or its lower parts are not the lower view's (a redirected or
// opaque directory). Every other directory shows exactly the lower view's
// files, so nothing beneath it changed.
//
// One report of the walking differ has no counterpart: Unmodified, which
// it gives for every unchanged file with more than one link anywhere in
// the image, only so that a changed file sharing that inode number on the
// mount can be written as a link of it. Finding those names takes the
// walk of the whole image this package exists to avoid, so overclone
// writes only the changed name. For a file copied up and linked anew that
// is right (without index=on the kernel broke the old links at copy-up;
// overlayfs only shows the old inode number); for a file of a renamed
// directory that is also linked from outside it, the layer holds a copy
// where the merged view has a link.
func (pr pair) changes(ctx context.Context, fn changeFunc) error {
	m, err := pr.merged.Resolve("")
	if err != nil {
		return err
	}
	l, err := pr.lower.Resolve("")
	if err != nil {
		return err
	}
	return pr.walkDir(ctx, m, l, fn)
}

// walkDir compares the children of a directory present in both views.
func (pr pair) walkDir(ctx context.Context, m, l fileops.Entry, fn changeFunc) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if inUpper(m) && sameLowerDirs(m, l) {
		return pr.walkUpperNames(ctx, m, fn)
	}
	ms, err := pr.merged.ReadDir(m.Path)
	if err != nil {
		return err
	}
	ls, err := pr.lower.ReadDir(l.Path)
	if err != nil {
		return err
	}
	i, j := 0, 0
	for i < len(ms) || j < len(ls) {
		var mc, lc *fileops.Entry
		switch {
		case j == len(ls) || (i < len(ms) && ms[i].Info.Name() < ls[j].Info.Name()):
			mc = &ms[i]
			i++
		case i == len(ms) || ms[i].Info.Name() > ls[j].Info.Name():
			lc = &ls[j]
			j++
		default:
			mc, lc = &ms[i], &ls[j]
			i++
			j++
		}
		if mc != nil && mc.Err != nil {
			return mc.Err
		}
		if lc != nil && lc.Err != nil {
			return lc.Err
		}
		switch {
		case mc == nil:
			// Gone from the merged view: one whiteout, also for a whole
			// directory, whose children the walking differ skips.
			if err := fn(fs.ChangeKindDelete, lc.Path, fileops.Entry{}); err != nil {
				return err
			}
		case lc == nil:
			if err := pr.addTree(ctx, *mc, fn); err != nil {
				return err
			}
		default:
			if err := pr.compare(ctx, *mc, *lc, fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// walkUpperNames compares the children of a directory whose lower parts
// are the lower view's: only a name the upper holds (a file, a directory,
// a whiteout) can show differently, so only those are looked up, and a
// directory of thousands of image files costs what the container wrote in
// it, not a listing of them all.
func (pr pair) walkUpperNames(ctx context.Context, m fileops.Entry, fn changeFunc) error {
	names, err := pr.merged.Names(m.Dirs[0])
	if err != nil {
		return err
	}
	sort.Strings(names)
	for _, n := range names {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := path.Join(m.Path, n)
		mc, mok, err := resolve(pr.merged, p)
		if err != nil {
			return err
		}
		lc, lok, err := resolve(pr.lower, p)
		if err != nil {
			return err
		}
		switch {
		case !mok && !lok:
			// A whiteout of nothing, or a name fileops hides.
		case !mok:
			if err := fn(fs.ChangeKindDelete, p, fileops.Entry{}); err != nil {
				return err
			}
		case !lok:
			if err := pr.addTree(ctx, mc, fn); err != nil {
				return err
			}
		default:
			if err := pr.compare(ctx, mc, lc, fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// resolve looks p up in s; absent is (_, false, nil).
func resolve(s *fileops.Stack, p string) (fileops.Entry, bool, error) {
	e, err := s.Resolve(p)
	if errors.Is(err, iofs.ErrNotExist) {
		return fileops.Entry{}, false, nil
	}
	return e, err == nil, err
}

// compare handles a name both views show.
func (pr pair) compare(ctx context.Context, m, l fileops.Entry, fn changeFunc) error {
	mDir, lDir := m.Kind == fileops.KindDir, l.Kind == fileops.KindDir
	switch {
	case mDir && lDir:
		same, err := pr.sameMeta(m, l)
		if err != nil {
			return err
		}
		if !same {
			if err := fn(fs.ChangeKindModify, m.Path, m); err != nil {
				return err
			}
		}
		if !inUpper(m) && sameLowerDirs(m, l) {
			return nil // the lower view's directory, untouched
		}
		return pr.walkDir(ctx, m, l, fn)
	case mDir:
		// A directory where the lower view has a file: it and all it
		// holds are new.
		if err := fn(fs.ChangeKindModify, m.Path, m); err != nil {
			return err
		}
		return pr.addChildren(ctx, m, fn)
	case lDir:
		// A file over a directory: the tar entry replaces the whole
		// directory when applied; its children get no whiteouts.
		return fn(fs.ChangeKindModify, m.Path, m)
	}
	if m.Layer == l.Layer+1 && m.RealPath == l.RealPath {
		return nil // the very file the lower view shows
	}
	same, err := pr.sameFile(m, l)
	if err != nil || same {
		return err
	}
	return fn(fs.ChangeKindModify, m.Path, m)
}

// addTree reports e and, for a directory, everything the merged view shows
// beneath it as added: whatever the lower view had there, it had no
// directory.
func (pr pair) addTree(ctx context.Context, e fileops.Entry, fn changeFunc) error {
	if err := fn(fs.ChangeKindAdd, e.Path, e); err != nil {
		return err
	}
	if e.Kind != fileops.KindDir {
		return nil
	}
	return pr.addChildren(ctx, e, fn)
}

func (pr pair) addChildren(ctx context.Context, e fileops.Entry, fn changeFunc) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	children, err := pr.merged.ReadDir(e.Path)
	if err != nil {
		return err
	}
	for _, c := range children {
		if c.Err != nil {
			return c.Err
		}
		if err := pr.addTree(ctx, c, fn); err != nil {
			return err
		}
	}
	return nil
}

// inUpper reports a merged directory the upper has a part of.
func inUpper(m fileops.Entry) bool {
	return len(m.Dirs) > 0 && m.Dirs[0].Layer == 0
}

// sameLowerDirs reports a merged directory whose lower parts are exactly
// the lower view's directory (the merged stack counts the upper as layer 0,
// the lower view starts at the first lower).
func sameLowerDirs(m, l fileops.Entry) bool {
	var lowers []fileops.Location
	for _, d := range m.Dirs {
		if d.Layer > 0 {
			lowers = append(lowers, fileops.Location{Layer: d.Layer - 1, Path: d.Path})
		}
	}
	if len(lowers) != len(l.Dirs) {
		return false
	}
	for i := range lowers {
		if lowers[i] != l.Dirs[i] {
			return false
		}
	}
	return true
}

// sameMeta is the walking differ's test for a directory present in both
// trees: same type and mode, owner, device number and file capability.
// A directory's times and size do not count.
func (pr pair) sameMeta(m, l fileops.Entry) (bool, error) {
	if m.Stat.Mode != l.Stat.Mode || m.Stat.Uid != l.Stat.Uid || m.Stat.Gid != l.Stat.Gid || m.Stat.Rdev != l.Stat.Rdev {
		return false, nil
	}
	c1, _, err := pr.merged.Xattr(m, capabilityXattr)
	if err != nil {
		return false, err
	}
	c2, _, err := pr.lower.Xattr(l, capabilityXattr)
	if err != nil {
		return false, err
	}
	return bytes.Equal(c1, c2), nil
}

// sameFile is the walking differ's test (continuity's sameFile) for a
// non-directory present in both trees: metadata as for a directory, then
// size and modification time; only when both times have no sub-second part
// (a filesystem or a tar that keeps seconds) are the link texts or the
// contents compared.
func (pr pair) sameFile(m, l fileops.Entry) (bool, error) {
	if same, err := pr.sameMeta(m, l); err != nil || !same {
		return false, err
	}
	if m.Stat.Size != l.Stat.Size || m.Stat.Mtim.Sec != l.Stat.Mtim.Sec {
		return false, nil
	}
	if m.Stat.Mtim.Nsec != 0 || l.Stat.Mtim.Nsec != 0 {
		return m.Stat.Mtim.Nsec == l.Stat.Mtim.Nsec, nil
	}
	switch {
	case m.Kind == fileops.KindSymlink:
		t1, err := pr.merged.Readlink(m)
		if err != nil {
			return false, err
		}
		t2, err := pr.lower.Readlink(l)
		return t1 == t2, err
	case m.Kind != fileops.KindFile || m.Stat.Size == 0:
		return true, nil
	}
	return pr.sameContent(m, l)
}

func (pr pair) sameContent(m, l fileops.Entry) (bool, error) {
	f1, err := pr.merged.OpenData(m)
	if err != nil {
		return false, err
	}
	defer f1.Close()
	f2, err := pr.lower.OpenData(l)
	if err != nil {
		return false, err
	}
	defer f2.Close()
	b1, b2 := make([]byte, 32<<10), make([]byte, 32<<10)
	for {
		n1, err1 := io.ReadFull(f1, b1)
		n2, err2 := io.ReadFull(f2, b2)
		if n1 != n2 || !bytes.Equal(b1[:n1], b2[:n2]) {
			return false, nil
		}
		e1, e2 := eof(err1), eof(err2)
		if e1 != nil || e2 != nil {
			return false, fmt.Errorf("compare %s: %w", m.Path, errors.Join(e1, e2))
		}
		if err1 != nil || err2 != nil {
			return err1 != nil && err2 != nil, nil
		}
	}
}

// eof drops the ends of file io.ReadFull reports.
func eof(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return nil
	}
	return err
}
