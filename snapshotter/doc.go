// Package snapshotter is overclone's containerd snapshots.Snapshotter: its
// metadata lives in containerd's bolt MetaStore and its layers under the
// root as
//
//	ROOT/metadata.db           bolt metadata (containerd core/snapshots/storage),
//	                           plus overclone's own bucket (the root's mode,
//	                           the dedupe index)
//	ROOT/snapshots/<id>/fs     the snapshot's files: in overlay mode the layer's
//	                           changes (overlay upperdir), in userspace mode its
//	                           whole view
//	ROOT/snapshots/<id>/work   overlay workdir, active snapshots only
//	ROOT/snapshots/<id>/image  a size-limited active's ext4 image, loop-mounted
//	                           on snapshots/<id> itself, so that its fs and
//	                           work are inside it (loopimage.go); or, on a
//	                           btrfs root with quotas enabled, snapshots/<id>
//	                           is itself a subvolume with a qgroup limit
//	                           (qgroup.go); an image taken from the pool
//	                           is of a size class, held to its limit by
//	                           ext4's reserve (reserve.go)
//	ROOT/images/               ext4-*: formatted image templates, one per
//	                           size class (template.go); pool-*: images kept
//	                           ready, mounted detached (imagepool.go)
//	ROOT/l/<base36 id>         short links to ../snapshots/<id>/fs, made for
//	                           stacks too deep for their plain paths to fit
//	                           in the one-page lowerdir= option
//	ROOT/flat/<id>             the merged view of committed snapshot <id> and
//	                           every layer below it, for stacks deeper than one
//	                           overlay mount takes
//	ROOT/empty/                the lower of a layer unpacked without a parent
//	ROOT/remap/<id>-<digest>   the view of committed snapshot <id> with its
//	                           owners shifted for one uid/gid mapping, where
//	                           the kernel cannot idmap layers (remap_copy.go)
//	ROOT/trash/                directories on their way out
//
// It differs from containerd's built-in overlayfs snapshotter where that one
// blocks or loses things: Commit computes usage outside the bolt write
// transaction, Remove drops the metadata before it renames and deletes,
// directories left by a crash never make a later call fail, directory
// renames from lower layers work through overlay's redirect_dir, stacks of
// any depth mount, layers unpacked in parallel keep their whiteouts, and
// where overlay cannot serve at all, userspace mode needs none.
//
// It must never hand out a mount whose directories are not in the metadata,
// and never delete a directory the metadata still names.
package snapshotter
