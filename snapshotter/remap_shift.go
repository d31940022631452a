package snapshotter

import (
	"encoding/binary"
	"fmt"

	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/fileops"
)

// capabilityXattr holds a file's capabilities.
const capabilityXattr = "security.capability"

// ownerMap shifts the owners of a copy fileops makes for a mapped
// snapshot (fileops.WithOwnerMap) as containerd's client does for a
// snapshotter without remap-ids, keeping what a chown would take away: the
// set-id bits and file capabilities, which fileops sets after the owner.
// The copy is made entry by entry on descriptors this process created, in
// a directory no container can reach, so the owner is set once, when the
// inode is made, and no walk changes it afterwards.
//
// An id the mapping does not hold is FailedPrecondition, as in containerd's
// client: the container would see the file as owned by nobody.
func (m *idMapping) ownerMap(uid, gid uint32, caps []byte) (uint32, uint32, []byte, error) {
	hu, uok := toHost(uid, m.uids)
	hg, gok := toHost(gid, m.gids)
	if !uok || !gok {
		return 0, 0, nil, fmt.Errorf("%d:%d is outside the mapping uid %q gid %q: %w",
			uid, gid, m.uidLabel, m.gidLabel, errdefs.ErrFailedPrecondition)
	}
	if hu == uid && hg == gid {
		return uid, gid, caps, nil
	}
	caps, err := shiftCaps(caps, m)
	if err != nil {
		return 0, 0, nil, err
	}
	return hu, hg, caps, nil
}

// flattenOpts are the options of a copy made for m: none without a
// mapping.
func (m *idMapping) flattenOpts() []fileops.FlattenOpt {
	if m == nil {
		return nil
	}
	return []fileops.FlattenOpt{fileops.WithOwnerMap(m.ownerMap)}
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
