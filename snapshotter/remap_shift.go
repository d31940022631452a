package snapshotter

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// capabilityXattr holds a file's capabilities; chown drops it.
const capabilityXattr = "security.capability"

// shiftOwners gives every inode under dir the host ids its owner maps to,
// as containerd's client does for a snapshotter without remap-ids, keeping
// what chown takes away: the set-id bits and file capabilities.
//
// dir is a copy this process has just made (snapshots/new-*/fs, or
// snapshots/<id>/remap-new-*), in the 0700 root and mounted nowhere: no
// container can change a name under it while it is walked, and nothing in
// it is followed (Lchown, and a symlink is never chmod'ed).
//
// An id the mapping does not hold is FailedPrecondition, as in containerd's
// client: the container would see the file as owned by nobody.
func shiftOwners(ctx context.Context, dir string, m *idMapping) error {
	// A hard link's inode is shifted once, at its first name.
	type inode struct{ dev, ino uint64 }
	shifted := map[inode]bool{}
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return fmt.Errorf("shift owner of %s: %w", path, err)
		}
		if st.Nlink > 1 && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			key := inode{uint64(st.Dev), st.Ino}
			if shifted[key] {
				return nil
			}
			shifted[key] = true
		}
		uid, uok := toHost(st.Uid, m.uids)
		gid, gok := toHost(st.Gid, m.gids)
		if !uok || !gok {
			return fmt.Errorf("shift owner of %s: %d:%d is outside the mapping uid %q gid %q: %w",
				path, st.Uid, st.Gid, m.uidLabel, m.gidLabel, errdefs.ErrFailedPrecondition)
		}
		if uid == st.Uid && gid == st.Gid {
			return nil
		}
		isLink := st.Mode&unix.S_IFMT == unix.S_IFLNK
		var caps []byte
		if st.Mode&unix.S_IFMT == unix.S_IFREG {
			if caps, err = getXattr(path, capabilityXattr); err != nil {
				return fmt.Errorf("shift owner of %s: %w", path, err)
			}
			if caps, err = shiftCaps(caps, m); err != nil {
				return fmt.Errorf("shift owner of %s: %w", path, err)
			}
		}
		if err := unix.Lchown(path, int(uid), int(gid)); err != nil {
			return fmt.Errorf("shift owner of %s to %d:%d: %w", path, uid, gid, err)
		}
		// Capabilities before mode: setting them clears set-id bits too.
		if caps != nil {
			if err := unix.Lsetxattr(path, capabilityXattr, caps, 0); err != nil {
				return fmt.Errorf("shift owner of %s: keep %s: %w", path, capabilityXattr, err)
			}
		}
		if !isLink && st.Mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
			if err := unix.Chmod(path, st.Mode&0o7777); err != nil {
				return fmt.Errorf("shift owner of %s: keep mode %o: %w", path, st.Mode&0o7777, err)
			}
		}
		return nil
	})
}

// File capability xattr layouts (linux/capability.h): a little-endian
// magic with the revision in its top byte, two {permitted, inheritable}
// pairs, and in version 3 the host uid of the user namespace root they
// belong to.
const (
	capRevisionMask = 0xff000000
	capRevision2    = 0x02000000
	capRevision3    = 0x03000000
	capSize2        = 4 + 2*8
	capSize3        = capSize2 + 4
)

// shiftCaps rewrites file capabilities for the mapped container: the
// kernel honours them only for the user namespace whose root owns them, a
// version 2 value (no owner) meaning the initial namespace's root. Shifted,
// they are version 3 with the mapped id of their root, what the kernel
// itself stores when the container's root sets them. Seen from inside the
// container they read back as the version 2 value of the image.
func shiftCaps(caps []byte, m *idMapping) ([]byte, error) {
	if caps == nil {
		return nil, nil
	}
	if len(caps) < 4 {
		return nil, fmt.Errorf("%s of %d bytes: %w", capabilityXattr, len(caps), errdefs.ErrFailedPrecondition)
	}
	magic := binary.LittleEndian.Uint32(caps)
	var root uint32
	switch {
	case magic&capRevisionMask == capRevision2 && len(caps) == capSize2:
	case magic&capRevisionMask == capRevision3 && len(caps) == capSize3:
		root = binary.LittleEndian.Uint32(caps[capSize2:])
	default:
		// Version 1 (32-bit sets) no kernel writes today: kept as it is.
		return caps, nil
	}
	host, ok := toHost(root, m.uids)
	if !ok {
		return nil, fmt.Errorf("%s owned by uid %d, outside the mapping %q: %w", capabilityXattr, root, m.uidLabel, errdefs.ErrFailedPrecondition)
	}
	out := make([]byte, capSize3)
	copy(out, caps[:capSize2])
	binary.LittleEndian.PutUint32(out, magic&^capRevisionMask|capRevision3)
	binary.LittleEndian.PutUint32(out[capSize2:], host)
	return out, nil
}

// getXattr reads one xattr of path, not following a symlink; nil when the
// file has none.
func getXattr(path, name string) ([]byte, error) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Lgetxattr(path, name, buf)
		switch {
		case err == nil:
			return buf[:n], nil
		case errors.Is(err, unix.ENODATA), errors.Is(err, unix.ENOTSUP):
			return nil, nil
		case errors.Is(err, unix.ERANGE):
			buf = make([]byte, len(buf)*4)
		default:
			return nil, fmt.Errorf("get %s: %w", name, err)
		}
	}
}
