package metrics

import (
	"context"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// scrapeWalkTimeout bounds the Walk a scrape does to count snapshots: a
// read transaction never waits for writers in bolt, so this only trips on
// a wedged disk, and then the scrape should answer without the count
// rather than hang Prometheus.
const scrapeWalkTimeout = 5 * time.Second

// kindCountReuse is how long one count of snapshots answers scrapes. The
// metrics address is not authenticated and may be on the node's network;
// each count walks every snapshot, so scrapes in a burst share one walk.
// Prometheus scrapes every 15 s or more, so a scraper never sees a count
// older than its own previous scrape.
const kindCountReuse = 5 * time.Second

// NewRegistry returns a registry with every overclone metric, the Go
// runtime's and the process's. sn is counted by kind on every scrape (a
// Walk in one read transaction, which blocks no writer, shared by the
// scrapes of the next kindCountReuse), and the file at
// dbPath is the metadata database whose size is reported.
func NewRegistry(sn snapshots.Snapshotter, dbPath string) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		callLatency, callErrors, callsInFlight, copied, flattenedLayers,
		&kindCollector{sn: sn},
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace,
			Name:      "metadata_db_bytes",
			Help:      "Size of the bolt metadata database file.",
		}, func() float64 {
			fi, err := os.Stat(dbPath)
			if err != nil {
				return 0
			}
			return float64(fi.Size())
		}),
	)
	if m, ok := sn.(interface{ Missing() map[string]string }); ok {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace,
			Name:      "snapshots_unusable",
			Help:      "Snapshots whose directory is missing from disk: refused until removed. Alert on anything above 0.",
		}, func() float64 { return float64(len(m.Missing())) }))
	}
	return reg
}

// kindCollector counts snapshots by kind when scraped, so that the count
// can never drift from the metadata the way a gauge kept by hand would
// across a crash.
type kindCollector struct {
	sn snapshots.Snapshotter

	// mu is held through a count, so that concurrent scrapes wait for
	// it rather than walk again.
	mu      sync.Mutex
	countAt time.Time
	counts  map[snapshots.Kind]int
	err     error
}

var kindDesc = prometheus.NewDesc(namespace+"_snapshots", "Snapshots in the metadata, by kind.", []string{"kind"}, nil)

func (c *kindCollector) Describe(ch chan<- *prometheus.Desc) { ch <- kindDesc }

func (c *kindCollector) Collect(ch chan<- prometheus.Metric) {
	counts, err := c.count()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(kindDesc, err)
		return
	}
	for kind, n := range counts {
		ch <- prometheus.MustNewConstMetric(kindDesc, prometheus.GaugeValue, float64(n), strings.ToLower(kind.String()))
	}
}

// count returns the snapshots by kind, walking the metadata only if the
// last count (or its failure) is older than kindCountReuse.
func (c *kindCollector) count() (map[snapshots.Kind]int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.countAt.IsZero() && time.Since(c.countAt) < kindCountReuse {
		return c.counts, c.err
	}
	ctx, cancel := context.WithTimeout(context.Background(), scrapeWalkTimeout)
	defer cancel()
	counts := map[snapshots.Kind]int{snapshots.KindActive: 0, snapshots.KindView: 0, snapshots.KindCommitted: 0}
	err := c.sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		counts[info.Kind]++
		return nil
	})
	if err != nil {
		log.G(ctx).WithError(err).Warn("metrics: failed to count snapshots")
		counts = nil
	}
	c.counts, c.err, c.countAt = counts, err, time.Now()
	return counts, err
}
