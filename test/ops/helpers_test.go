package ops

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// unixHTTP is an HTTP client that dials the unix socket at path whatever
// the URL's host.
func unixHTTP(path string) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// metric returns the value of the sample name{labels} in a Prometheus text
// exposition; labels is written as the exposition writes it (sorted).
func metric(body, name, labels string) (float64, bool) {
	sel := name
	if labels != "" {
		sel += "{" + labels + "}"
	}
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(sel) + ` (\S+)$`)
	m := re.FindStringSubmatch(body)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(m[1], 64)
	return v, err == nil
}

// scraper reads the daemon's metrics socket.
type scraper struct {
	t    *testing.T
	http *http.Client
}

func (s scraper) value(name, labels string) float64 {
	s.t.Helper()
	code, body := get(s.t, s.http, "http://overclone/metrics")
	if code != http.StatusOK {
		s.t.Fatalf("/metrics: %d %s", code, body)
	}
	v, ok := metric(body, name, labels)
	if !ok {
		s.t.Fatalf("no sample %s{%s} in\n%s", name, labels, body)
	}
	return v
}

// waitInFlight polls until a call of method is running in the daemon, so
// that a signal or a cancel lands on a call the daemon has taken.
func (s scraper) waitInFlight(method string, done <-chan error) bool {
	s.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return false
		default:
		}
		if s.value("overclone_snapshotter_calls_in_flight", `method="`+method+`"`) > 0 {
			return true
		}
		time.Sleep(2 * time.Millisecond)
	}
	s.t.Fatalf("no %s in flight after 30s", method)
	return false
}

// bigLayerFiles makes a Commit (its usage walk and its syncfs) last long
// enough for a signal or a cancel to land while it runs, even on a fast
// idle machine.
const bigLayerFiles = 10000

// prepareBig prepares key with bigLayerFiles files of 4 KiB written into
// its upper.
func prepareBig(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, key string) {
	t.Helper()
	m, err := sn.Prepare(ctx, key, "")
	if err != nil {
		t.Fatal(err)
	}
	dir := m[0].Source
	block := make([]byte, 4096)
	for i := 0; i < bigLayerFiles; i += 500 {
		sub := filepath.Join(dir, fmt.Sprintf("d%03d", i/500))
		if err := os.Mkdir(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		for j := i; j < i+500 && j < bigLayerFiles; j++ {
			if err := os.WriteFile(filepath.Join(sub, strconv.Itoa(j)), block, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
