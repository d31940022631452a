package overlayutil

import (
	"fmt"
	"os"
	"syscall"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"
)

// idmapProbeHostID is the host uid and gid that id 0 maps to in the probe's
// user namespace; any id other than 0 shows whether the mapping applies.
const idmapProbeHostID = 666

// checkIDMapped makes an idmapped bind mount of a scratch dir with
// mount_setattr(MOUNT_ATTR_IDMAP) and a user namespace mapping 0 to
// idmapProbeHostID, then stacks an overlay on it the way containerd does
// for remapped snapshots. Both must show the mapped owner: overlay accepted
// idmapped layers later (5.19) than bind mounts got them (5.12).
func (p *prober) checkIDMapped() Check {
	return p.needsMount(Check{Name: CheckIDMapped}, func(s *scratch, c *Check) error {
		opts, err := p.layers(s, 1, true)
		if err != nil {
			return err
		}
		if err := s.writeFile("l0/f", "x"); err != nil {
			return err
		}
		if err := s.mkdirs("mapped", "merged"); err != nil {
			return err
		}
		if err := os.Lchown(s.path("upper"), idmapProbeHostID, idmapProbeHostID); err != nil {
			return fmt.Errorf("chown %s: %w", s.path("upper"), err)
		}
		idmap := fmt.Sprintf("0:%d:1", idmapProbeHostID)
		userns, err := mount.GetUsernsFD(idmap, idmap)
		if err != nil {
			return fmt.Errorf("make a user namespace for %s: %w", idmap, err)
		}
		defer userns.Close()

		tree, err := unix.OpenTree(unix.AT_FDCWD, s.path("l0"), unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
		if err != nil {
			return fmt.Errorf("open_tree %s: %w", s.path("l0"), err)
		}
		defer unix.Close(tree)
		attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_IDMAP | unix.MOUNT_ATTR_RDONLY, Userns_fd: uint64(userns.Fd())}
		if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, &attr); err != nil {
			return fmt.Errorf("mount_setattr MOUNT_ATTR_IDMAP on a bind of %s: %w", s.path("l0"), err)
		}
		if err := unix.MoveMount(tree, "", unix.AT_FDCWD, s.path("mapped"), unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
			return fmt.Errorf("move idmapped bind to %s: %w", s.path("mapped"), err)
		}
		s.track(s.path("mapped"))
		if err := ownedBy(s.path("mapped/f"), idmapProbeHostID); err != nil {
			return fmt.Errorf("idmapped bind mount: %w", err)
		}
		opts[len(opts)-1] = "lowerdir=" + s.path("mapped")
		if err := s.overlay("merged", 0, append([]string{"index=off"}, opts...)...); err != nil {
			return fmt.Errorf("idmapped bind mounts work, overlay on one does not: %w", err)
		}
		if err := ownedBy(s.path("merged/f"), idmapProbeHostID); err != nil {
			return fmt.Errorf("overlay over an idmapped lower: %w", err)
		}
		c.OK = true
		return nil
	})
}

func ownedBy(path string, id int) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != id || int(st.Gid) != id {
		return fmt.Errorf("%s shows owner %d:%d, want %d:%d", path, st.Uid, st.Gid, id, id)
	}
	return nil
}
