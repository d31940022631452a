// Package dedupe measures overclone's layer dedupe against containerd's
// built-in overlayfs snapshotter holding the same images (measure_test.go,
// OVERCLONE_MEASURE=1) on a loop-mounted xfs with reflink.
package dedupe
