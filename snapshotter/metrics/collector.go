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

// Copy methods, the method label of Copied: a clone shares extents,
// copy_file_range copies in the kernel, copy goes through userspace.
const (
	MethodReflink       = "reflink"
	MethodCopyFileRange = "copy_file_range"
	MethodCopy          = "copy"
)

// Why overclone copied, the reason label of Copied: building the flattened
// layer of a deep stack, or materializing a snapshot's parent in userspace
// mode.
const (
	ReasonFlatten     = "flatten"
	ReasonMaterialize = "materialize"
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
	// Not named for copy-up: the kernel's copy-up of a container's
	// writes never passes through overclone and is not counted here.
	copied = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace,
		Name:      "copied_bytes_total",
		Help:      "Bytes overclone itself copied (never the kernel's copy-up), by reason (flatten: a deep stack's flattened layer; materialize: a userspace-mode snapshot) and method (reflink, copy_file_range, copy).",
	}, []string{"reason", "method"})
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
	for _, r := range []string{ReasonFlatten, ReasonMaterialize} {
		for _, m := range []string{MethodReflink, MethodCopyFileRange, MethodCopy} {
			copied.WithLabelValues(r, m)
		}
	}
}

// Copied counts n bytes overclone copied for reason by method (one of the
// Reason and Method constants).
func Copied(reason, method string, n int64) {
	copied.WithLabelValues(reason, method).Add(float64(n))
}

// FlattenedLayerBuilt records one flattened layer that took d to build.
func FlattenedLayerBuilt(d time.Duration) {
	flattenedLayers.Observe(d.Seconds())
}
