// Package ops tests what a node operator relies on, against the real
// daemon: metrics, health, pprof, systemd readiness, graceful stop, and
// what the socket does with hostile or impatient clients.
package ops
