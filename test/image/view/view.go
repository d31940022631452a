// Package view prints a directory tree as the end-to-end tests compare it:
// one line per path with type, mode, owner, size, content digest, symlink
// target, hard-link group and file capabilities. The test image's entrypoint
// prints it from inside a container; the image model prints the same format
// from the layers it wrote, so a test compares the two byte for byte.
//
// It must stay free of cgo and of anything beyond the standard library and
// x/sys: it is linked into a static binary that runs in an image with no libc.
package view

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Names the viewer's write command touches, shared with the tests that check
// what a container wrote.
const (
	AppendFile     = "append.txt"
	AppendLine     = "appended by the container\n"
	CreatedDir     = "created"
	CreatedFile    = "created/new.txt"
	CreatedContent = "created by the container\n"
	RemovedFile    = "merged/lower.txt"
	ChmodFile      = "keep.txt"
)

// CapXattr is the only xattr the view prints: the one a snapshotter most
// easily loses (writing data or chown after setting it drops it).
const CapXattr = "security.capability"

// Entry is one line of a view.
type Entry struct {
	Path     string // slash-separated, relative to the root, "." for the root
	Type     byte   // 'd', 'f', 'l', 'c', 'b', 'p', 's'
	Mode     uint32 // permission and setuid/setgid/sticky bits
	UID, GID uint32
	Size     int64  // regular files only
	SHA256   string // regular files only
	Target   string // symlinks only
	HardLink string // regular files: the first path (in view order) sharing the inode
	Cap      []byte // security.capability, if set

	// Inode groups hard links: entries with the same non-zero Inode are one
	// file. Format turns it into HardLink; it is not printed itself.
	Inode uint64
}

// String formats e as one view line, without the newline.
func (e Entry) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %c %04o %d:%d", e.Path, e.Type, e.Mode, e.UID, e.GID)
	switch e.Type {
	case 'f':
		fmt.Fprintf(&b, " size=%d sha256=%s", e.Size, e.SHA256)
		if e.HardLink != "" {
			fmt.Fprintf(&b, " hardlink=%s", e.HardLink)
		}
	case 'l':
		fmt.Fprintf(&b, " -> %s", e.Target)
	}
	if len(e.Cap) > 0 {
		fmt.Fprintf(&b, " cap=%s", hex.EncodeToString(e.Cap))
	}
	return b.String()
}

// Format returns the view of entries: sorted by path, one line each, every
// hard link after the first naming the first.
func Format(entries []Entry) string {
	sorted := append([]Entry(nil), entries...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Path < sorted[j].Path })
	first := map[uint64]string{}
	var b strings.Builder
	for _, e := range sorted {
		if e.Inode != 0 {
			if p, ok := first[e.Inode]; ok {
				e.HardLink = p
			} else {
				first[e.Inode] = e.Path
			}
		}
		b.WriteString(e.String())
		b.WriteByte('\n')
	}
	return b.String()
}

// Write prints the view of root to w.
func Write(w io.Writer, root string) error {
	entries, err := Read(root)
	if err != nil {
		return err
	}
	_, err = io.WriteString(w, Format(entries))
	return err
}

// Read walks root and returns its entries.
func Read(root string) ([]Entry, error) {
	type inode struct{ dev, ino uint64 }
	ids := map[inode]uint64{}
	var entries []Entry
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", path, err)
		}
		e := Entry{
			Path: filepath.ToSlash(rel),
			Type: typeOf(st.Mode),
			Mode: st.Mode & 0o7777,
			UID:  st.Uid,
			GID:  st.Gid,
		}
		switch e.Type {
		case 'f':
			e.Size = st.Size
			if e.SHA256, err = digest(path); err != nil {
				return err
			}
			if st.Nlink > 1 {
				id := inode{uint64(st.Dev), st.Ino}
				if ids[id] == 0 {
					ids[id] = uint64(len(ids) + 1)
				}
				e.Inode = ids[id]
			}
		case 'l':
			if e.Target, err = os.Readlink(path); err != nil {
				return err
			}
			e.Mode = 0 // symlink permissions mean nothing on Linux
		}
		if e.Cap, err = getCap(path); err != nil {
			return err
		}
		entries = append(entries, e)
		return nil
	})
	return entries, err
}

func typeOf(mode uint32) byte {
	switch mode & syscall.S_IFMT {
	case syscall.S_IFDIR:
		return 'd'
	case syscall.S_IFREG:
		return 'f'
	case syscall.S_IFLNK:
		return 'l'
	case syscall.S_IFCHR:
		return 'c'
	case syscall.S_IFBLK:
		return 'b'
	case syscall.S_IFIFO:
		return 'p'
	default:
		return 's'
	}
}

// Digest returns the hex sha256 of r's content.
func Digest(r io.Reader) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func digest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	d, err := Digest(f)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return d, nil
}

func getCap(path string) ([]byte, error) {
	buf := make([]byte, 64)
	n, err := unix.Lgetxattr(path, CapXattr, buf)
	switch {
	case err == nil:
		return buf[:n], nil
	case errors.Is(err, unix.ENODATA), errors.Is(err, unix.ENOTSUP):
		return nil, nil
	default:
		return nil, fmt.Errorf("getxattr %s %s: %w", path, CapXattr, err)
	}
}
