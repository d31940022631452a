package fileops

import (
	"io/fs"
	"os"
	"path"
	"time"

	"golang.org/x/sys/unix"
)

// Kind is the type of a file as the merged view shows it.
type Kind uint8

const (
	KindUnknown Kind = iota
	KindFile
	KindDir
	KindSymlink
	KindFIFO
	KindSocket
	KindCharDevice
	KindBlockDevice
)

var kindNames = [...]string{"unknown", "file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "unknown"
}

func kindOf(mode uint32) Kind {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return KindFile
	case unix.S_IFDIR:
		return KindDir
	case unix.S_IFLNK:
		return KindSymlink
	case unix.S_IFIFO:
		return KindFIFO
	case unix.S_IFSOCK:
		return KindSocket
	case unix.S_IFCHR:
		return KindCharDevice
	case unix.S_IFBLK:
		return KindBlockDevice
	}
	return KindUnknown
}

// Location is where one layer's part of an entry lives.
type Location struct {
	Layer int    // index into Stack.Layers()
	Path  string // path inside that layer; differs from the merged path under a redirect
}

// Entry is one name of the merged view and the layer that provides it.
type Entry struct {
	Path     string // merged path, slash separated, "" for the root
	Layer    int    // index into Stack.Layers() of the visible entry; 0 is the top
	LayerDir string
	RealPath string // the entry inside LayerDir (Location.Path of the top part)
	Kind     Kind
	Stat     unix.Stat_t // lstat of the real entry
	Info     os.FileInfo
	Opaque   bool // a directory that hides whatever lies below it
	// Dirs lists every layer directory merged into a directory entry, top
	// first; Dirs[0] is the visible one. Empty for non-directories.
	Dirs []Location
	// Metacopy marks a file whose metadata is at Layer/RealPath but whose
	// data lives in a lower file (overlayfs' metacopy=on); DataLayer and
	// DataPath name where to read it. For every other file they equal
	// Layer and RealPath.
	Metacopy  bool
	DataLayer int
	DataPath  string
	// Err is set on a ReadDir entry whose name is listed but cannot be
	// looked up, as a stat of it on the mount would fail; the other fields
	// then hold only Path and Info's name.
	Err error
}

// InUpper reports whether the visible entry already lives in the upper.
func (e Entry) InUpper(s *Stack) bool { return s.hasUpper && e.Layer == 0 }

// fileInfo adapts a unix.Stat_t to os.FileInfo.
type fileInfo struct {
	name string
	st   *unix.Stat_t
}

func newInfo(p string, st *unix.Stat_t) os.FileInfo {
	name := path.Base("/" + p)
	return fileInfo{name: name, st: st}
}

func (f fileInfo) Name() string       { return f.name }
func (f fileInfo) Size() int64        { return f.st.Size }
func (f fileInfo) ModTime() time.Time { return time.Unix(f.st.Mtim.Unix()) }
func (f fileInfo) IsDir() bool        { return f.st.Mode&unix.S_IFMT == unix.S_IFDIR }
func (f fileInfo) Sys() any           { return f.st }
func (f fileInfo) Mode() fs.FileMode  { return fileMode(f.st.Mode) }

func fileMode(m uint32) fs.FileMode {
	mode := fs.FileMode(m & 0o777)
	switch m & unix.S_IFMT {
	case unix.S_IFDIR:
		mode |= fs.ModeDir
	case unix.S_IFLNK:
		mode |= fs.ModeSymlink
	case unix.S_IFIFO:
		mode |= fs.ModeNamedPipe
	case unix.S_IFSOCK:
		mode |= fs.ModeSocket
	case unix.S_IFCHR:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		mode |= fs.ModeDevice
	}
	if m&unix.S_ISUID != 0 {
		mode |= fs.ModeSetuid
	}
	if m&unix.S_ISGID != 0 {
		mode |= fs.ModeSetgid
	}
	if m&unix.S_ISVTX != 0 {
		mode |= fs.ModeSticky
	}
	return mode
}
