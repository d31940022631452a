package snapshotter

import (
	"path/filepath"

	"golang.org/x/sys/unix"
)

func mountOverlay(base, target string) error {
	opts := "lowerdir=" + filepath.Join(base, "lower") + ",upperdir=" + filepath.Join(base, "upper") + ",workdir=" + filepath.Join(base, "work")
	return unix.Mount("overlay", target, "overlay", 0, opts)
}

func unmount(target string) { unix.Unmount(target, unix.MNT_DETACH) }
