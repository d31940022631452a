// Package metrics makes overclone observable to Prometheus: it wraps a
// snapshots.Snapshotter to time every call and count its errors by errdefs
// class, counts snapshots by kind and the size of the metadata database
// when scraped, and holds the counters that layer flattening and
// userspace materialization feed.
//
// It knows nothing of how snapshots are stored, so that any part of
// overclone can feed it without an import cycle, and it must never change
// what a call returns.
package metrics
