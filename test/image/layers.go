package image

import (
	"encoding/binary"
	"io"
	"math/rand/v2"
)

// Paths the tests check by name, each for one thing a snapshotter can get
// wrong.
const (
	DataDir      = "data"
	WhiteoutFile = "data/deleted.txt"         // removed by a .wh. entry in layer 2
	WhiteoutDir  = "data/deleted-dir/old.txt" // its dir is whited out in layer 2, recreated in layer 3
	OpaqueLower  = "data/opaque/lower.txt"    // hidden by .wh..wh..opq in layer 2
	OpaqueNew    = "data/opaque/new.txt"      // added next to the opaque marker
	CapFile      = "data/caps/ping"           // carries security.capability
	BigFile      = "data/big"                 // 64 MiB, its own uncompressed layer
	BigSize      = 64 << 20
	SparseFile   = "data/sparse"
	SparseSize   = 16 << 20

	// AppendContent is data/append.txt as layer 1 writes it; the viewer's
	// write command appends to it.
	AppendContent = "line 1 from layer 1\n"
)

// capNetRaw is a vfs_cap_data revision 2 value: effective, permitted
// CAP_NET_RAW (13), what `setcap cap_net_raw+ep` writes.
var capNetRaw = func() []byte {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000000|0x1) // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
	binary.LittleEndian.PutUint32(b[4:], 1<<13)          // permitted, low word
	return b
}()

// layers returns the image's layers, bottom first. viewer is the static
// entrypoint binary.
func layers(viewer []byte) []layer {
	return []layer{
		{gzip: true, files: []file{
			dir("bin", 0o755),
			reg("bin/viewer", 0o755, viewer),
			dir("data", 0o755),
			reg("data/keep.txt", 0o644, []byte("kept in layer 1\n")),
			reg("data/deleted.txt", 0o644, []byte("whited out in layer 2\n")),
			reg("data/append.txt", 0o644, []byte(AppendContent)),
			reg("data/modified.txt", 0o644, []byte("v1\n")),
			reg("data/empty", 0o600, nil),
			owned(reg("data/owned.txt", 0o640, []byte("owned by 1000:1001\n")), 1000, 1001),
			reg("data/setuid", 0o4755, []byte("#!/bin/false\n")),
			dir("data/sticky", 0o1777),
			dir("data/opaque", 0o755),
			reg("data/opaque/lower.txt", 0o644, []byte("hidden by the opaque dir\n")),
			dir("data/opaque/sub", 0o755),
			reg("data/opaque/sub/deep.txt", 0o644, []byte("hidden too\n")),
			dir("data/merged", 0o755),
			reg("data/merged/lower.txt", 0o644, []byte("merged from layer 1\n")),
			reg("data/replaced", 0o644, []byte("a file that becomes a dir\n")),
			dir("data/dir-to-file", 0o755),
			reg("data/dir-to-file/child", 0o644, []byte("gone with its dir\n")),
			dir("data/deleted-dir", 0o755),
			reg("data/deleted-dir/old.txt", 0o644, []byte("whited out with its dir\n")),
			dir("data/hard", 0o755),
			reg("data/hard/a", 0o644, []byte("one inode, two names\n")),
			hardlink("data/hard/b", "data/hard/a"),
			symlink("data/link", "keep.txt"),
			symlink("data/dirlink", "merged"),
			symlink("data/dangling", "/nowhere"),
			dir("data/caps", 0o755),
			withCap(reg(CapFile, 0o755, []byte("#!/bin/false\n")), capNetRaw),
			sparse(SparseFile, 0o644, SparseSize, map[int64][]byte{
				0:              []byte("start of the sparse file\n"),
				8 << 20:        []byte("in the middle, after an 8 MiB hole\n"),
				SparseSize - 4: []byte("end\n"),
			}),
		}},
		{files: []file{
			generated(BigFile, 0o644, BigSize, func(w io.Writer) error {
				_, err := io.CopyN(w, rand.NewChaCha8([32]byte{'o', 'v', 'e', 'r', 'c', 'l', 'o', 'n', 'e'}), BigSize)
				return err
			}),
		}},
		{gzip: true, files: []file{
			whiteout("data/deleted.txt"),
			whiteout("data/deleted-dir"),
			opaque("data/opaque"),
			reg("data/opaque/new.txt", 0o644, []byte("next to the opaque marker\n")),
			reg("data/merged/upper.txt", 0o644, []byte("merged from layer 3\n")),
			reg("data/modified.txt", 0o644, []byte("v2, longer than v1\n")),
			dir("data/replaced", 0o750),
			reg("data/replaced/inside.txt", 0o644, []byte("inside the dir that replaced a file\n")),
		}},
		{gzip: true, files: []file{
			// A dir created over a whiteout must not show what the
			// whiteout hid: the snapshotter has to make it opaque.
			dir("data/deleted-dir", 0o700),
			reg("data/deleted-dir/fresh.txt", 0o644, []byte("recreated in layer 4\n")),
			reg("data/dir-to-file", 0o644, []byte("a dir that became a file\n")),
			dir("data/merged", 0o775),
		}},
	}
}
