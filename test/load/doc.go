// Package load runs many clients against the real daemon at once, on
// parents of their own and shared ones, and reports latency per call.
package load
