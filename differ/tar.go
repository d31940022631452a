package differ

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive/tarheader"
	cfs "github.com/containerd/continuity/fs"

	"github.com/overclone/overclone/fileops"
)

const (
	// whiteoutPrefix marks a deleted name in an OCI layer (image-spec
	// layer.md, "Whiteouts").
	whiteoutPrefix = ".wh."
	// paxXattr prefixes an xattr in a PAX header, as GNU tar and
	// containerd's archive package write them.
	paxXattr        = "SCHILY.xattr."
	capabilityXattr = "security.capability"
)

// layerWriter writes the changes of a pair as an OCI layer tar, entry for
// entry as containerd's archive.ChangeWriter writes the walking differ's
// changes: the same headers (PAX, times truncated to the second and capped
// at the source date epoch, no access or change times, only the
// security.capability xattr), whiteouts dated 1970, the parents of an
// entry written before it when the changes did not name them, and a file
// whose inode was already written as a hard link to its first name.
//
// ChangeWriter reads every file by its path under one mounted root; this
// writer reads them from the layers through fileops, so that nothing is
// mounted and a name in the container's upper is never followed.
type layerWriter struct {
	tw         *tar.Writer
	merged     *fileops.Stack
	upperBound *time.Time
	linkSrc    map[inode]string
	addedDirs  map[string]struct{}
}

type inode struct{ dev, ino uint64 }

func newLayerWriter(w io.Writer, merged *fileops.Stack, upperBound *time.Time) *layerWriter {
	return &layerWriter{
		tw:         tar.NewWriter(w),
		merged:     merged,
		upperBound: upperBound,
		linkSrc:    map[inode]string{},
		addedDirs:  map[string]struct{}{},
	}
}

// handle writes one change; p is the merged path without a leading slash.
func (lw *layerWriter) handle(ctx context.Context, k cfs.ChangeKind, p string, e fileops.Entry) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if k == cfs.ChangeKindDelete {
		// containerd 2.0 dates whiteouts at the epoch, not at the
		// source date epoch, so that they never depend on the build.
		t := time.Unix(0, 0).UTC()
		dir, base := path.Split(p)
		hdr := &tar.Header{
			Typeflag:   tar.TypeReg,
			Name:       dir + whiteoutPrefix + base,
			ModTime:    t,
			AccessTime: t,
			ChangeTime: t,
		}
		if err := lw.includeParents(ctx, hdr); err != nil {
			return err
		}
		if err := lw.tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("write whiteout of %s: %w", p, err)
		}
		return nil
	}
	if e.Kind == fileops.KindSocket {
		return nil // a socket is no content; the walking differ drops them too
	}
	var link string
	if e.Kind == fileops.KindSymlink {
		var err error
		if link, err = lw.merged.Readlink(e); err != nil {
			return err
		}
	}
	hdr, err := tarheader.FileInfoHeaderNoLookups(statInfo(e), link)
	if err != nil {
		return fmt.Errorf("tar header of %s: %w", p, err)
	}
	// PAX keeps sub-second times, which the truncation below drops, so
	// that the header does not depend on how the stdlib would round them.
	hdr.Format = tar.FormatPAX
	if lw.upperBound != nil && hdr.ModTime.After(*lw.upperBound) {
		hdr.ModTime = *lw.upperBound
	}
	hdr.ModTime = hdr.ModTime.Truncate(time.Second)
	hdr.AccessTime = time.Time{}
	hdr.ChangeTime = time.Time{}
	hdr.Name = p
	if e.Kind == fileops.KindDir {
		hdr.Name += "/"
	}

	if e.Kind != fileops.KindDir && e.Stat.Nlink > 1 {
		key := inode{uint64(e.Stat.Dev), e.Stat.Ino}
		if src, ok := lw.linkSrc[key]; ok {
			hdr.Typeflag = tar.TypeLink
			hdr.Linkname = src
			hdr.Size = 0
		} else {
			lw.linkSrc[key] = hdr.Name
		}
	}

	if c, ok, err := lw.merged.Xattr(e, capabilityXattr); err != nil {
		return err
	} else if ok && len(c) > 0 {
		hdr.PAXRecords = map[string]string{paxXattr + capabilityXattr: string(c)}
	}

	if err := lw.includeParents(ctx, hdr); err != nil {
		return err
	}
	if err := lw.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write header of %s: %w", p, err)
	}
	if hdr.Typeflag != tar.TypeReg || hdr.Size == 0 {
		return nil
	}
	f, err := lw.merged.OpenData(e)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.Copy(lw.tw, io.LimitReader(f, hdr.Size))
	if err != nil {
		return fmt.Errorf("copy %s: %w", p, err)
	}
	if n != hdr.Size {
		return fmt.Errorf("copy %s: file shrank from %d to %d bytes while written: %w", p, hdr.Size, n, io.ErrUnexpectedEOF)
	}
	return nil
}

// includeParents writes the parent directory of an entry first when no
// change named it: a tar that adds /a/b/c to a layer must carry /a/b with
// its metadata, or the applier would make it with defaults.
func (lw *layerWriter) includeParents(ctx context.Context, hdr *tar.Header) error {
	name := strings.TrimRight(hdr.Name, "/")
	parent := path.Dir(name)
	if parent != "." {
		if _, ok := lw.addedDirs[parent]; !ok {
			lw.addedDirs[parent] = struct{}{}
			e, err := lw.merged.Resolve(parent)
			if err != nil {
				return err
			}
			if err := lw.handle(ctx, cfs.ChangeKindModify, parent, e); err != nil {
				return err
			}
		}
	}
	if hdr.Typeflag == tar.TypeDir {
		lw.addedDirs[name] = struct{}{}
	}
	return nil
}

func (lw *layerWriter) Close() error {
	if err := lw.tw.Close(); err != nil {
		return fmt.Errorf("close layer tar: %w", err)
	}
	return nil
}

// statInfo presents an entry to the tar header code the way os.Lstat of
// the mounted file presents it: the header code reads owner and device
// numbers from a *syscall.Stat_t.
func statInfo(e fileops.Entry) fs.FileInfo {
	st := &syscall.Stat_t{
		Dev:   e.Stat.Dev,
		Ino:   e.Stat.Ino,
		Nlink: e.Stat.Nlink,
		Mode:  e.Stat.Mode,
		Uid:   e.Stat.Uid,
		Gid:   e.Stat.Gid,
		Rdev:  e.Stat.Rdev,
		Size:  e.Stat.Size,
		Mtim:  syscall.Timespec{Sec: e.Stat.Mtim.Sec, Nsec: e.Stat.Mtim.Nsec},
	}
	return entryInfo{e: e, st: st}
}

type entryInfo struct {
	e  fileops.Entry
	st *syscall.Stat_t
}

func (i entryInfo) Name() string       { return i.e.Info.Name() }
func (i entryInfo) Size() int64        { return i.st.Size }
func (i entryInfo) Mode() fs.FileMode  { return i.e.Info.Mode() }
func (i entryInfo) ModTime() time.Time { return time.Unix(i.st.Mtim.Sec, i.st.Mtim.Nsec) }
func (i entryInfo) IsDir() bool        { return i.e.Kind == fileops.KindDir }
func (i entryInfo) Sys() any           { return i.st }
