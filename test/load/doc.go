// Package load runs many clients against the real daemon at once, on
// parents of their own and shared ones, and reports latency per call; and
// the same clients against containerd's built-in overlayfs snapshotter,
// served from a process of its own (test/builtin), side by side.
package load
