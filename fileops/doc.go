// Package fileops is overclone's userspace overlay engine: it reads a stack
// of layer directories the way the kernel's overlayfs would show them when
// mounted, and writes into the stack's upper layer the way the kernel's
// copy-up does — without mounting anything.
//
// The snapshotter uses it where a mount is impossible or too costly: to
// resolve and copy files out of unmounted snapshots, to copy up before a
// range operation, and to flatten deep stacks into a single layer.
//
// Two promises hold everywhere:
//
//   - Every path is resolved beneath its layer root with openat2
//     RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS and per-component lookups, so a
//     symlink inside a layer never leads outside it and ".." never climbs
//     out. A path with a NUL byte is an error.
//   - The source of a data operation is always the topmost visible version
//     of a file, never a stale lower copy, and a destination that exists only
//     in a lower layer is copied up before it is written.
//
// The package never mounts, never talks to containerd and never changes a
// lower layer.
package fileops
