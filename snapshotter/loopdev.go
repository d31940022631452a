package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// An image unmounted here may still be mounted elsewhere: a mount
// namespace made while it was mounted (a container's, a shim's, any
// unshare) holds a copy of the mount, and where the host's mounts are not
// shared (a root mounted private, as on hosts without systemd and in many
// containers) unmounting here leaves that copy, and with it the image's
// filesystem and its loop device, alive. Binding the image to a second
// loop device then runs a second ext4 on the same blocks, each instance
// with its own cache and journal: the second replays the journal the
// first is still writing, and reads come back with bad checksums
// (EBADMSG). So an image mounted again (reattachImage) is mounted from the
// loop device already bound to it, if one is, which gives a new mount of
// the one live filesystem, as util-linux's mount -o loop does.

// remountImage mounts the image file path detached: from the loop device
// bound to it already, if one is, or from a new one.
func remountImage(ctx context.Context, path string) (int, error) {
	loop, err := boundLoop(path)
	if err != nil {
		return -1, err
	}
	if loop == nil {
		return mountImage(path)
	}
	defer loop.Close() // the mount holds the device from here on
	log.G(ctx).WithField("path", path).WithField("device", loop.Name()).Info("size-limit image still mounted elsewhere (another mount namespace holds it): mounted again from its loop device")
	return mountLoop(loop, path)
}

// boundLoop opens the loop device bound to the file path, or returns nil
// when none is. The device is matched by the backing file's device and
// inode, which cannot be reused while the device holds the file open, and
// checked on the descriptor it returns: a device bound and held open stays
// bound until it is closed.
func boundLoop(path string) (*os.File, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	// A loop device has a loop/ dir in sysfs only while it is bound.
	bound, err := filepath.Glob("/sys/block/loop*/loop")
	if err != nil {
		return nil, err
	}
	for _, b := range bound {
		dev := "/dev/" + filepath.Base(filepath.Dir(b))
		f, err := os.OpenFile(dev, os.O_RDONLY, 0)
		if err != nil {
			continue // cleared since the glob, or no node for it here
		}
		info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
		if err == nil && info.Device == st.Dev && info.Inode == st.Ino {
			return f, nil
		}
		f.Close()
		if err != nil && !errors.Is(err, unix.ENXIO) {
			return nil, fmt.Errorf("loop status of %s: %w", dev, err)
		}
	}
	return nil, nil
}
