package fileops

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Readers of entries a Resolve or ReadDir returned, for callers that
// serialize a merged view (the differ writing a layer tar): they reach the
// real files beneath their layer roots, as the rest of the package does,
// and never by the merged path again.

// OpenData opens the file holding a regular file entry's data read-only:
// the entry itself, or for a metacopy file the lower file below it, which
// is what a read through the mount returns.
func (s *Stack) OpenData(e Entry) (*os.File, error) {
	if e.Kind != KindFile {
		return nil, fmt.Errorf("open data of %s: a %s has no data: %w", e.Path, e.Kind, os.ErrInvalid)
	}
	v := s.newView()
	defer v.close()
	fd, err := v.openData(e)
	if err != nil {
		return nil, fmt.Errorf("open data of %s in layer %s: %w", e.Path, s.layers[e.DataLayer], err)
	}
	return os.NewFile(uintptr(fd), s.layers[e.DataLayer]+"/"+e.DataPath), nil
}

// Readlink returns the text of a symlink entry.
func (s *Stack) Readlink(e Entry) (string, error) {
	if e.Kind != KindSymlink {
		return "", fmt.Errorf("readlink %s: a %s: %w", e.Path, e.Kind, os.ErrInvalid)
	}
	v := s.newView()
	defer v.close()
	return v.readlink(e)
}

// Xattr reads one extended attribute of the visible entry, the one whose
// metadata the mount shows (for a metacopy file, the upper one). A missing
// attribute is (nil, false, nil).
func (s *Stack) Xattr(e Entry, name string) ([]byte, bool, error) {
	v := s.newView()
	defer v.close()
	root, err := v.root(e.Layer)
	if err != nil {
		return nil, false, err
	}
	dir, base := parentName(e.RealPath)
	pfd, err := openBeneath(root, dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, false, fmt.Errorf("open %s in layer %s: %w", dir, e.LayerDir, err)
	}
	defer closeFD(pfd)
	if base == "" {
		base = "."
	}
	val, ok, err := getXattr(procPath(pfd, base), name)
	if err != nil {
		return nil, false, fmt.Errorf("get %s of %s in layer %s: %w", name, e.RealPath, e.LayerDir, err)
	}
	return val, ok, nil
}

// Names lists the names one layer holds in its part of a directory (a
// Location of Entry.Dirs) as they are on disk: whiteouts, and names the
// layers below hide or show, included. A caller that knows the layers
// below are unchanged learns from it what this layer can have changed.
func (s *Stack) Names(loc Location) ([]string, error) {
	if loc.Layer < 0 || loc.Layer >= len(s.layers) {
		return nil, fmt.Errorf("names of %s: no layer %d: %w", loc.Path, loc.Layer, os.ErrInvalid)
	}
	v := s.newView()
	defer v.close()
	dirs, err := v.openDirs([]Location{loc})
	if err != nil {
		return nil, err
	}
	defer closeDirs(dirs)
	names, err := readNames(dirs[0].fd)
	if err != nil {
		return nil, fmt.Errorf("read dir %s in layer %s: %w", loc.Path, s.layers[loc.Layer], err)
	}
	return names, nil
}
