package snapshotter

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The few btrfs ioctls a qgroup-limited snapshot needs (qgroup.go), from
// linux/btrfs.h and linux/btrfs_tree.h. containerd's own
// github.com/containerd/btrfs/v2 has subvolume create and delete but no
// qgroup call, takes paths rather than descriptors (it opens the parent by
// name, and its delete walks the tree first), and needs cgo with the
// btrfs-progs headers; x/sys/unix has no btrfs ioctl at all. Every call
// here works on a descriptor the caller opened.

const (
	btrfsIocSubvolCreate  = 0x5000940e // _IOW(0x94, 14, struct btrfs_ioctl_vol_args)
	btrfsIocSnapDestroy   = 0x5000940f // _IOW(0x94, 15, struct btrfs_ioctl_vol_args)
	btrfsIocTreeSearchV2  = 0xc0709411 // _IOWR(0x94, 17, struct btrfs_ioctl_search_args_v2)
	btrfsIocInoLookup     = 0xd0009412 // _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args)
	btrfsIocFsInfo        = 0x8400941f // _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args)
	btrfsIocQgroupCreate  = 0x4010942a // _IOW(0x94, 42, struct btrfs_ioctl_qgroup_create_args)
	btrfsIocQgroupLimit   = 0x8030942b // _IOR(0x94, 43, struct btrfs_ioctl_qgroup_limit_args)
	btrfsIocGetSubvolInfo = 0x81f8943c // _IOR(0x94, 60, struct btrfs_ioctl_get_subvol_info_args)

	btrfsPathNameMax = 4087

	// A subvolume's root directory is always this inode.
	btrfsFirstFreeObjectID = 256
	btrfsInodeItemKey      = 1

	btrfsQgroupLimitMaxRfer = 1
)

// btrfsVolArgs is struct btrfs_ioctl_vol_args.
type btrfsVolArgs struct {
	Fd   int64
	Name [btrfsPathNameMax + 1]byte
}

func btrfsIoctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}

func volArgs(name string) (*btrfsVolArgs, error) {
	var a btrfsVolArgs
	if len(name) > btrfsPathNameMax {
		return nil, fmt.Errorf("subvolume name %q too long", name)
	}
	copy(a.Name[:], name)
	return &a, nil
}

// btrfsSubvolCreate makes a subvolume named name in the directory dirfd.
func btrfsSubvolCreate(dirfd int, name string) error {
	a, err := volArgs(name)
	if err != nil {
		return err
	}
	return btrfsIoctl(dirfd, btrfsIocSubvolCreate, unsafe.Pointer(a))
}

// btrfsSubvolDestroy deletes the subvolume named name in the directory
// dirfd, whatever it holds: the kernel unlinks it at once and its cleaner
// frees the tree in the background. The kernel looks the name up in dirfd
// alone and refuses (EINVAL) a name that is not a subvolume's root.
func btrfsSubvolDestroy(dirfd int, name string) error {
	a, err := volArgs(name)
	if err != nil {
		return err
	}
	return btrfsIoctl(dirfd, btrfsIocSnapDestroy, unsafe.Pointer(a))
}

// btrfsSubvolID is the id of the subvolume holding fd (its tree id, and
// the id of its level-0 qgroup).
func btrfsSubvolID(fd int) (uint64, error) {
	var a struct {
		TreeID   uint64
		ObjectID uint64
		Name     [4080]byte
	}
	a.ObjectID = btrfsFirstFreeObjectID
	if err := btrfsIoctl(fd, btrfsIocInoLookup, unsafe.Pointer(&a)); err != nil {
		return 0, err
	}
	return a.TreeID, nil
}

// btrfsFsInfo is struct btrfs_ioctl_fs_info_args.
type btrfsFsInfo struct {
	MaxID          uint64
	NumDevices     uint64
	FsID           [16]byte
	NodeSize       uint32
	SectorSize     uint32
	CloneAlignment uint32
	CsumType       uint16
	CsumSize       uint16
	Flags          uint64
	Generation     uint64
	_              [1024 - 64]byte
}

// btrfsFsInfoFlagGeneration asks BTRFS_IOC_FS_INFO for the generation.
const btrfsFsInfoFlagGeneration = 1 << 1

// btrfsFsID is the filesystem's id as /sys/fs/btrfs/ names it.
func btrfsFsID(fd int) (string, error) {
	var a btrfsFsInfo
	if err := btrfsIoctl(fd, btrfsIocFsInfo, unsafe.Pointer(&a)); err != nil {
		return "", err
	}
	u := a.FsID
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]), nil
}

// btrfsRootGenerations reads the subvolume holding fd's root item:
// generation, the transaction that last wrote its tree as recorded when
// that transaction committed (or, for a new subvolume, the transaction
// that made it: set at once); and otransid, that creating transaction.
func btrfsRootGenerations(fd int) (generation, otransid uint64, err error) {
	var a struct {
		TreeID     uint64
		Name       [256]byte
		ParentID   uint64
		DirID      uint64
		Generation uint64
		Flags      uint64
		UUIDs      [3][16]byte
		CTransID   uint64
		OTransID   uint64
		_          [504 - 360]byte
	}
	if err := btrfsIoctl(fd, btrfsIocGetSubvolInfo, unsafe.Pointer(&a)); err != nil {
		return 0, 0, err
	}
	return a.Generation, a.OTransID, nil
}

// btrfsGeneration is the filesystem's generation: its running
// transaction's id, or its last one's when none is running.
func btrfsGeneration(fd int) (uint64, error) {
	a := btrfsFsInfo{Flags: btrfsFsInfoFlagGeneration}
	if err := btrfsIoctl(fd, btrfsIocFsInfo, unsafe.Pointer(&a)); err != nil {
		return 0, err
	}
	if a.Flags&btrfsFsInfoFlagGeneration == 0 {
		return 0, fmt.Errorf("this kernel's BTRFS_IOC_FS_INFO gives no generation: %w", unix.EOPNOTSUPP)
	}
	return a.Generation, nil
}

// btrfsQgroupDelete deletes the level-0 qgroup of subvolume id, from fd
// on the same filesystem.
func btrfsQgroupDelete(fd int, id uint64) error {
	a := struct{ Create, QgroupID uint64 }{QgroupID: id}
	return btrfsIoctl(fd, btrfsIocQgroupCreate, unsafe.Pointer(&a))
}

// btrfsLimitReferenced sets the max-referenced limit of the qgroup of the
// subvolume holding fd (qgroup id 0 means that one).
func btrfsLimitReferenced(fd int, bytes uint64) error {
	a := struct {
		QgroupID uint64
		Flags    uint64
		MaxRfer  uint64
		MaxExcl  uint64
		RsvRfer  uint64
		RsvExcl  uint64
	}{Flags: btrfsQgroupLimitMaxRfer, MaxRfer: bytes}
	return btrfsIoctl(fd, btrfsIocQgroupLimit, unsafe.Pointer(&a))
}

// btrfsSearchKey is struct btrfs_ioctl_search_key.
type btrfsSearchKey struct {
	TreeID                   uint64
	MinObjectID, MaxObjectID uint64
	MinOffset, MaxOffset     uint64
	MinTransID, MaxTransID   uint64
	MinType, MaxType         uint32
	NrItems                  uint32
	_                        uint32
	_                        [4]uint64
}

// searchHeaderSize is sizeof(struct btrfs_ioctl_search_header).
const searchHeaderSize = 32

// searchBufSize is the result buffer of one tree search. The kernel
// faults in the whole buffer on every call, so a bigger one costs each
// Usage of a small upper more than it saves a big one (measured, 200
// uppers of 500 files: 1 MiB made a poll cost as much CPU as the
// built-in's walks).
const searchBufSize = 64 << 10

// searchBufs keeps search buffers between calls: a fresh one would be
// zeroed and faulted in again by every Usage.
var searchBufs = sync.Pool{New: func() any {
	b := make([]byte, int(unsafe.Sizeof(btrfsSearchKey{}))+8+searchBufSize)
	return &b
}}

// btrfsCountInodes counts the inode items of subvolume tree, from fd on
// the same filesystem: every inode of the subvolume, read from the live
// tree (what is written but not yet committed included). The search
// cannot ask for one item type alone (its range is over whole keys), so
// every item comes back and the inode items are counted. newest is the
// highest generation of the leaves read. It stops, with ctx's error,
// between two search calls once ctx is done.
func btrfsCountInodes(ctx context.Context, fd int, tree uint64) (n int64, newest uint64, err error) {
	err = btrfsSearch(ctx, fd, tree, 0, false, func(h []byte) {
		newest = max(newest, binary.NativeEndian.Uint64(h[0:]))
		if binary.NativeEndian.Uint32(h[24:]) == btrfsInodeItemKey {
			n++
		}
	})
	return n, newest, err
}

// btrfsChangedSince tells whether subvolume tree has a leaf written in a
// transaction after gen. The search skips every subtree whose node is
// older, so an unchanged tree costs one call that reads its root node.
// Every change to the set of inodes shows: a create or an unlink writes
// its parent directory's inode item, whose leaf survives the change.
func btrfsChangedSince(fd int, tree, gen uint64) (bool, error) {
	changed := false
	err := btrfsSearch(context.Background(), fd, tree, gen+1, true, func([]byte) { changed = true })
	return changed, err
}

// btrfsSearch calls fn with the header of every item of tree in leaves of
// generation minTrans or newer, or of the first one only.
func btrfsSearch(ctx context.Context, fd int, tree, minTrans uint64, first bool, fn func(header []byte)) error {
	bp := searchBufs.Get().(*[]byte)
	defer searchBufs.Put(bp)
	buf := *bp
	key := (*btrfsSearchKey)(unsafe.Pointer(&buf[0]))
	*key = btrfsSearchKey{
		TreeID:      tree,
		MinObjectID: btrfsFirstFreeObjectID, MaxObjectID: ^uint64(0),
		MaxOffset:  ^uint64(0),
		MinTransID: minTrans, MaxTransID: ^uint64(0),
		MaxType: 255,
	}
	off := int(unsafe.Sizeof(*key))
	binary.NativeEndian.PutUint64(buf[off:], searchBufSize)
	items := buf[off+8:]
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		key.NrItems = ^uint32(0)
		if first {
			key.NrItems = 1
		}
		if err := btrfsIoctl(fd, btrfsIocTreeSearchV2, unsafe.Pointer(&buf[0])); err != nil {
			return err
		}
		if key.NrItems == 0 {
			return nil
		}
		var obj, offset uint64
		var typ uint32
		p := 0
		for range key.NrItems {
			h := items[p : p+searchHeaderSize]
			obj = binary.NativeEndian.Uint64(h[8:])
			offset = binary.NativeEndian.Uint64(h[16:])
			typ = binary.NativeEndian.Uint32(h[24:])
			fn(h)
			p += searchHeaderSize + int(binary.NativeEndian.Uint32(h[28:]))
		}
		if first {
			return nil
		}
		// Go on from the key after the last one returned.
		key.MinObjectID, key.MinType, key.MinOffset = obj, typ, offset
		switch {
		case offset < ^uint64(0):
			key.MinOffset++
		case typ < 255:
			key.MinType, key.MinOffset = typ+1, 0
		case obj < ^uint64(0):
			key.MinObjectID, key.MinType, key.MinOffset = obj+1, 0, 0
		default:
			return nil
		}
	}
}
