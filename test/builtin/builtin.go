// Package builtin opens containerd's built-in overlayfs snapshotter the way
// containerd's plugin does with its default configuration, so that what
// overclone is measured and tested against is what a node runs, not the
// library's bare defaults.
package builtin

import (
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay/overlayutils"
)

// Config names the built-in's shipped configuration, for tables and logs.
const Config = "containerd's plugin defaults: sync_remove = false (asynchronous remove: Remove drops the metadata, Cleanup deletes the directories), no upperdir label, no extra mount options, idmapped layers if the kernel has them"

// Overlay opens the built-in overlayfs snapshotter at root with the options
// containerd's plugin (plugins/snapshots/overlay/plugin) passes when its
// config is empty. overlay.NewSnapshotter(root) alone removes
// synchronously, which no default containerd does: measured against it,
// every Remove looked like it cost the built-in the whole directory.
func Overlay(root string) (snapshots.Snapshotter, error) {
	// sync_remove = false is the plugin's default; upperdir_label and
	// mount_options are off and empty.
	opts := []overlay.Opt{overlay.AsynchronousRemove}
	// The plugin turns idmapped layers on whenever the kernel has them;
	// they change nothing without uid/gid mapping labels.
	if ok, err := overlayutils.SupportsIDMappedMounts(); err == nil && ok {
		opts = append(opts, overlay.WithRemapIDs)
	}
	return overlay.NewSnapshotter(root, opts...)
}
