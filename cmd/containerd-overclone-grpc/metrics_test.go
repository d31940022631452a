package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"

	"github.com/overclone/overclone/snapshotter"
)

// TestMetricsAddressWarnsOffLoopback: a metrics address reachable from the
// network serves /healthz and /metrics to anyone; the daemon says so
// once, at start, as a warning. Loopback and unix socket addresses are
// quiet.
func TestMetricsAddressWarnsOffLoopback(t *testing.T) {
	sn, err := snapshotter.New(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	for _, tc := range []struct {
		address string
		warns   bool
	}{
		{"0.0.0.0:0", true},
		{"[::]:0", true},
		{"127.0.0.1:0", false},
		{"localhost:0", false},
		{"unix://" + filepath.Join(t.TempDir(), "metrics.sock"), false},
	} {
		var buf bytes.Buffer
		l := logrus.New()
		l.SetOutput(&buf)
		ctx := log.WithLogger(context.Background(), logrus.NewEntry(l))
		stop, err := serveMetrics(ctx, tc.address, sn)
		if err != nil {
			t.Fatalf("%s: %v", tc.address, err)
		}
		stop()
		warned := strings.Contains(buf.String(), "level=warning") && strings.Contains(buf.String(), "not loopback")
		if warned != tc.warns {
			t.Errorf("%s: warned %t, want %t:\n%s", tc.address, warned, tc.warns, buf.String())
		}
	}
}
