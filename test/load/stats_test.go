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
	mu         sync.Mutex
	latencies  map[string][]time.Duration
	errors     map[string]int // "method class"
	unexpected []string       // the first few unexpected errors, whole
	elapsed    time.Duration  // how long the calls ran
}

// maxUnexpected is how many unexpected errors are kept whole.
const maxUnexpected = 5

func (s *stats) noteUnexpected(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.unexpected) < maxUnexpected {
		s.unexpected = append(s.unexpected, msg)
	}
}

// merge adds o's calls and time to s: runs of the same phase taken in
// turns count as one.
func (s *stats) merge(o *stats) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for m, l := range o.latencies {
		s.latencies[m] = append(s.latencies[m], l...)
	}
	for k, n := range o.errors {
		s.errors[k] += n
	}
	for _, u := range o.unexpected {
		if len(s.unexpected) < maxUnexpected {
			s.unexpected = append(s.unexpected, u)
		}
	}
	s.elapsed += o.elapsed
}

// sorted returns the latencies of the named methods (all, with none
// named), sorted.
func (s *stats) sorted(methods ...string) []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	var l []time.Duration
	if len(methods) == 0 {
		for _, ml := range s.latencies {
			l = append(l, ml...)
		}
	}
	for _, m := range methods {
		l = append(l, s.latencies[m]...)
	}
	sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
	return l
}

// rate is calls per second.
func (s *stats) rate(n int) float64 {
	if s.elapsed <= 0 {
		return 0
	}
	return float64(n) / s.elapsed.Seconds()
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
