// Package snapshotter is overclone's containerd snapshots.Snapshotter: overlay
// snapshots whose metadata lives in containerd's bolt MetaStore and whose
// layers live under the root as
//
//	ROOT/metadata.db           bolt metadata (containerd core/snapshots/storage)
//	ROOT/snapshots/<id>/fs     the layer's files (overlay upperdir)
//	ROOT/snapshots/<id>/work   overlay workdir, active snapshots only
//	ROOT/l/<short>             symlink to ../snapshots/<id>/fs of a committed
//	                           layer, so that deep lowerdir= options stay short
//	ROOT/trash/                directories on their way out
//
// It differs from containerd's built-in overlayfs snapshotter where that one
// blocks or loses things: Commit computes usage outside the bolt write
// transaction, Remove renames before it deletes, directories left by a crash
// never make a later call fail, and directory renames from lower layers work
// through overlay's redirect_dir.
//
// It must never hand out a mount whose directories are not in the metadata,
// and never delete a directory the metadata still names.
package snapshotter
