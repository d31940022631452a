// Package differ is overclone's containerd differ: a diff.Comparer that
// turns an active snapshot's changes into an OCI layer by reading its
// overlay upper, not by walking the whole image twice as containerd's
// walking differ does. The daemon serves it as a proxy diff plugin
// ([proxy_plugins.overclone-diff] type = "diff"), placed before "walking"
// in the diff service's order.
//
// Two promises:
//
//   - The layer has the changes the walking differ finds for the same
//     mounts, written with the same headers (see layerWriter), so that
//     applying either on the parent gives the container's view. The
//     overlay details the kernel shows through the mount (whiteouts of
//     both forms, opaque and redirected directories, metacopy files,
//     hard links in the upper) are resolved by fileops, which reads the
//     layers as the kernel's overlayfs does.
//   - Only overclone's mounts are served: an overlay whose upperdir and
//     lowerdirs lie under overclone's root, compared with a view of the
//     same lowers. Anything else, and Apply, is errdefs.ErrNotImplemented,
//     on which containerd's diff service asks its next differ.
//
// The package never mounts, never writes into a layer and never follows a
// name in the container's upper: every file is reached beneath its layer
// root through fileops.
package differ
