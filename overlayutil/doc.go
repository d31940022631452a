// Package overlayutil knows what the running kernel's overlayfs can do on the
// filesystem under the snapshotter root, and builds overlay mounts that stay
// within what the kernel and containerd's core/mount accept.
//
// Every fact here is found by doing the real thing in a scratch directory
// under the root: mounting, renaming through a mount, cloning. It must never
// decide from a kernel version string (distributions backport and disable
// features), and it must never leave a mount or a scratch directory behind.
// It knows nothing about snapshots, metadata or containerd's gRPC contract;
// the snapshotter package decides policy from what this package reports.
package overlayutil
