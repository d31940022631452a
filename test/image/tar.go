package image

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"path"
	"sort"
	"strconv"

	"github.com/overclone/overclone/hack/ocilayout"
)

// file is one tar entry of a layer.
type file struct {
	path     string
	kind     byte // 'd' dir, 'f' regular, 'l' symlink, 'h' hard link, 'w' whiteout, 'o' opaque marker
	mode     int64
	uid, gid int
	data     []byte
	size     int64
	gen      func(io.Writer) error // content too large to hold: writes size bytes
	target   string                // symlink or hard link target
	cap      []byte
	holes    map[int64][]byte // sparse file: data segments by offset, zeros elsewhere
}

func dir(p string, mode int64) file { return file{path: p, kind: 'd', mode: mode} }
func reg(p string, mode int64, data []byte) file {
	return file{path: p, kind: 'f', mode: mode, data: data, size: int64(len(data))}
}
func generated(p string, mode, size int64, gen func(io.Writer) error) file {
	return file{path: p, kind: 'f', mode: mode, size: size, gen: gen}
}
func sparse(p string, mode, size int64, segments map[int64][]byte) file {
	return file{path: p, kind: 'f', mode: mode, size: size, holes: segments}
}
func symlink(p, target string) file  { return file{path: p, kind: 'l', target: target} }
func hardlink(p, target string) file { return file{path: p, kind: 'h', target: target} }
func whiteout(p string) file         { return file{path: p, kind: 'w'} }
func opaque(dir string) file         { return file{path: dir, kind: 'o'} }
func owned(f file, uid, gid int) file {
	f.uid, f.gid = uid, gid
	return f
}
func withCap(f file, c []byte) file {
	f.cap = c
	return f
}

// epoch is every entry's mtime, so that layers (and their digests) are
// reproducible.
var epoch = ocilayout.Epoch

// writeLayer writes files as one uncompressed tar stream to w.
func writeLayer(w io.Writer, files []file) error {
	tw := tar.NewWriter(w)
	modes := map[string]int64{}
	for _, f := range files {
		modes[f.path] = f.mode
		if f.holes != nil {
			// archive/tar cannot write sparse entries; write this one by
			// hand between two of the writer's entries.
			if err := tw.Flush(); err != nil {
				return err
			}
			if err := writeSparse(w, f); err != nil {
				return fmt.Errorf("write sparse %s: %w", f.path, err)
			}
			continue
		}
		hdr := &tar.Header{
			Name:    f.path,
			Mode:    f.mode,
			Uid:     f.uid,
			Gid:     f.gid,
			ModTime: epoch,
			Format:  tar.FormatPAX,
		}
		switch f.kind {
		case 'd':
			hdr.Typeflag, hdr.Name = tar.TypeDir, f.path+"/"
		case 'f':
			hdr.Typeflag, hdr.Size = tar.TypeReg, f.size
		case 'l':
			hdr.Typeflag, hdr.Linkname, hdr.Mode = tar.TypeSymlink, f.target, 0o777
		case 'h':
			// Appliers chmod the link to the header's mode, and the
			// link is the target's inode: carry the target's mode, as
			// GNU tar does.
			hdr.Typeflag, hdr.Linkname, hdr.Mode = tar.TypeLink, f.target, modes[f.target]
		case 'w':
			hdr.Typeflag, hdr.Name = tar.TypeReg, path.Join(path.Dir(f.path), ".wh."+path.Base(f.path))
		case 'o':
			hdr.Typeflag, hdr.Name = tar.TypeReg, path.Join(f.path, ".wh..wh..opq")
		default:
			return fmt.Errorf("%s: unknown kind %q", f.path, f.kind)
		}
		if f.cap != nil {
			hdr.PAXRecords = map[string]string{"SCHILY.xattr.security.capability": string(f.cap)}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("tar header %s: %w", f.path, err)
		}
		switch {
		case f.gen != nil:
			if err := f.gen(tw); err != nil {
				return fmt.Errorf("write %s: %w", f.path, err)
			}
		case f.kind == 'f':
			if _, err := tw.Write(f.data); err != nil {
				return fmt.Errorf("write %s: %w", f.path, err)
			}
		}
	}
	return tw.Close()
}

// writeSparse writes f as a PAX 1.0 sparse entry (what GNU tar --sparse
// --format=posix writes): an extended header naming the real file and size,
// then a ustar entry whose data starts with the sparse map in text.
func writeSparse(w io.Writer, f file) error {
	offsets := make([]int64, 0, len(f.holes))
	for off := range f.holes {
		offsets = append(offsets, off)
	}
	sort.Slice(offsets, func(i, j int) bool { return offsets[i] < offsets[j] })

	var sparseMap bytes.Buffer
	fmt.Fprintf(&sparseMap, "%d\n", len(offsets))
	var dataLen int64
	for _, off := range offsets {
		fmt.Fprintf(&sparseMap, "%d\n%d\n", off, len(f.holes[off]))
		dataLen += int64(len(f.holes[off]))
	}
	padTo512(&sparseMap)

	var pax bytes.Buffer
	for _, kv := range [][2]string{
		{"GNU.sparse.major", "1"},
		{"GNU.sparse.minor", "0"},
		{"GNU.sparse.name", f.path},
		{"GNU.sparse.realsize", strconv.FormatInt(f.size, 10)},
	} {
		pax.WriteString(paxRecord(kv[0], kv[1]))
	}
	paxLen := int64(pax.Len())
	padTo512(&pax)

	var out bytes.Buffer
	out.Write(ustarHeader(path.Join(path.Dir(f.path), "PaxHeaders.0", path.Base(f.path)), tar.TypeXHeader, 0o644, paxLen))
	out.Write(pax.Bytes())
	out.Write(ustarHeader(path.Join(path.Dir(f.path), "GNUSparseFile.0", path.Base(f.path)), tar.TypeReg, f.mode, int64(sparseMap.Len())+dataLen))
	out.Write(sparseMap.Bytes())
	for _, off := range offsets {
		out.Write(f.holes[off])
	}
	padTo512(&out)
	_, err := w.Write(out.Bytes())
	return err
}

// paxRecord formats "<len> key=value\n", where len counts itself.
func paxRecord(k, v string) string {
	body := " " + k + "=" + v + "\n"
	n := len(body) + 1
	for n != len(strconv.Itoa(n))+len(body) {
		n = len(strconv.Itoa(n)) + len(body)
	}
	return strconv.Itoa(n) + body
}

func padTo512(b *bytes.Buffer) {
	if r := b.Len() % 512; r != 0 {
		b.Write(make([]byte, 512-r))
	}
}

// ustarHeader returns one 512-byte ustar header block owned by root.
func ustarHeader(name string, typ byte, mode, size int64) []byte {
	b := make([]byte, 512)
	copy(b[0:100], name)
	octal(b[100:108], mode)
	octal(b[108:116], 0)
	octal(b[116:124], 0)
	octal(b[124:136], size)
	octal(b[136:148], epoch.Unix())
	b[156] = typ
	copy(b[257:263], "ustar\x00")
	copy(b[263:265], "00")
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

func octal(b []byte, v int64) {
	copy(b, fmt.Sprintf("%0*o\x00", len(b)-1, v))
}
