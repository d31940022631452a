package snapshotter

import (
	"context"
	"os"
	"strings"
)

// Features is what the snapshotter needs to know about the kernel's overlay
// to build mounts.
type Features struct {
	// Index: the kernel knows the index option, so "index=off" can be
	// passed, as containerd does, to let layers be mounted by many overlays.
	Index bool
	// RedirectDir: directory renames from a lower layer work (the kernel
	// records a redirect xattr instead of failing with EXDEV).
	RedirectDir bool
	// UserXattr: overlay must keep its xattrs in user.overlay.* (rootless).
	UserXattr bool
}

// overlayOptions turns the features and the configured options into the
// options every overlay mount carries. Configured options come last, so a
// user's choice wins (mount options are last-wins in the kernel), and a
// default is left out where the user already named that option.
func (f Features) overlayOptions(configured []string) []string {
	var opts []string
	if f.Index && !hasOption(configured, "index") {
		opts = append(opts, "index=off")
	}
	if f.UserXattr && !hasOption(configured, "userxattr") {
		opts = append(opts, "userxattr")
	}
	// userxattr turns redirect_dir off in the kernel; asking for both
	// fails the mount.
	if f.RedirectDir && !f.UserXattr && !hasOption(configured, "redirect_dir") {
		opts = append(opts, "redirect_dir=on")
	}
	return append(opts, configured...)
}

func hasOption(options []string, key string) bool {
	for _, o := range options {
		if k, _, _ := strings.Cut(o, "="); k == key {
			return true
		}
	}
	return false
}

// probeFeatures is the minimal check used until overlayutil's probes are
// wired in.
func probeFeatures(ctx context.Context, root string) Features {
	_, errIndex := os.Stat("/sys/module/overlay/parameters/index")
	_, errRedirect := os.Stat("/sys/module/overlay/parameters/redirect_dir")
	return Features{
		Index:       errIndex == nil,
		RedirectDir: errRedirect == nil,
		UserXattr:   os.Geteuid() != 0,
	}
}
