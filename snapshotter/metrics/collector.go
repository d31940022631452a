package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// namespace prefixes every metric, as containerd's own are "containerd_".
const namespace = "overclone"

// latencyBuckets span what a snapshotter call takes: a Stat answers in tens
// of microseconds, a Commit of a big layer walks it for seconds. The
// default Prometheus buckets start at 5 ms and would lump every metadata
// call into one bucket.
var latencyBuckets = prometheus.ExponentialBuckets(50e-6, 4, 11) // 50 µs .. 52 s

// flattenBuckets span building a flattened layer: from a few small layers
// (milliseconds) to hundreds of layers of a big image (minutes).
var flattenBuckets = prometheus.ExponentialBuckets(1e-3, 4, 10) // 1 ms .. 4.4 min

// Copy-up methods, the label values of CopiedUp: a clone shares extents,
// copy_file_range copies in the kernel, copy goes through userspace.
const (
	MethodReflink       = "reflink"
	MethodCopyFileRange = "copy_file_range"
	MethodCopy          = "copy"
)

var (
	callLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace,
		Subsystem: "snapshotter",
		Name:      "call_duration_seconds",
		Help:      "Time taken by snapshotter calls, by method.",
		Buckets:   latencyBuckets,
	}, []string{"method"})
	callErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace,
		Subsystem: "snapshotter",
		Name:      "call_errors_total",
		Help:      "Snapshotter calls that failed, by method and errdefs class.",
	}, []string{"method", "class"})
	callsInFlight = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace,
		Subsystem: "snapshotter",
		Name:      "calls_in_flight",
		Help:      "Snapshotter calls running now, by method.",
	}, []string{"method"})
	copiedUp = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace,
		Name:      "copied_up_bytes_total",
		Help:      "Bytes copied up into upper layers, by method (reflink, copy_file_range, copy).",
	}, []string{"method"})
	flattenedLayers = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: namespace,
		Name:      "flattened_layer_build_seconds",
		Help:      "Flattened layers built and the time each build took.",
		Buckets:   flattenBuckets,
	})
)

func init() {
	// Every method label exists from the start, so that a dashboard shows
	// zero rather than no data for a method not yet called.
	for _, m := range methods {
		callLatency.WithLabelValues(m)
		callsInFlight.WithLabelValues(m)
	}
	for _, m := range []string{MethodReflink, MethodCopyFileRange, MethodCopy} {
		copiedUp.WithLabelValues(m)
	}
}

// CopiedUp counts n bytes copied up by method (one of the Method constants).
func CopiedUp(method string, n int64) {
	copiedUp.WithLabelValues(method).Add(float64(n))
}

// FlattenedLayerBuilt records one flattened layer that took d to build.
func FlattenedLayerBuilt(d time.Duration) {
	flattenedLayers.Observe(d.Seconds())
}
