package load

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// stats collects call latencies by method and errors by class.
type stats struct {
	mu        sync.Mutex
	latencies map[string][]time.Duration
	errors    map[string]int // "method class"
}

func newStats() *stats {
	return &stats{latencies: map[string][]time.Duration{}, errors: map[string]int{}}
}

func (s *stats) add(method string, d time.Duration, class string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latencies[method] = append(s.latencies[method], d)
	if class != "" {
		s.errors[method+" "+class]++
	}
}

func (s *stats) calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, l := range s.latencies {
		n += len(l)
	}
	return n
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return sorted[i]
}

// table formats count, p50, p99 and max per method.
func (s *stats) table() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var methods []string
	for m := range s.latencies {
		methods = append(methods, m)
	}
	sort.Strings(methods)
	var b strings.Builder
	fmt.Fprintf(&b, "%-8s %8s %10s %10s %10s\n", "method", "calls", "p50", "p99", "max")
	for _, m := range methods {
		l := append([]time.Duration(nil), s.latencies[m]...)
		sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
		fmt.Fprintf(&b, "%-8s %8d %10v %10v %10v\n", m, len(l),
			percentile(l, 0.50).Round(time.Microsecond), percentile(l, 0.99).Round(time.Microsecond), l[len(l)-1].Round(time.Microsecond))
	}
	var keys []string
	for k := range s.errors {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	b.WriteString("errors by method and class:")
	if len(keys) == 0 {
		b.WriteString(" none")
	}
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%d", k, s.errors[k])
	}
	return b.String()
}
