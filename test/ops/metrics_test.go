package ops

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/overclone/overclone/test/daemon"
)

// TestMetrics: the metrics socket serves per-method latency and errors by
// class, snapshots by kind, the db size and the copied-bytes and flatten
// families (at zero until fed); /healthz answers 200; pprof answers on the
// debug address.
func TestMetrics(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	dir := t.TempDir()
	metricsSock := filepath.Join(dir, "metrics.sock")
	debugAddr := freeLoopbackPort(t)
	d := daemon.Start(t, t.TempDir(), fmt.Sprintf("metrics_address = %q\ndebug_address = %q\n", "unix://"+metricsSock, debugAddr))
	sn := d.Client()

	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "a", ""); err == nil {
		t.Fatal("second Prepare of a key succeeded")
	}
	if err := sn.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Stat(ctx, "nothing"); err == nil {
		t.Fatal("Stat of a missing key succeeded")
	}

	s := scraper{t: t, http: unixHTTP(metricsSock)}
	for _, want := range []struct {
		name, labels string
		value        float64
	}{
		{"overclone_snapshotter_call_duration_seconds_count", `method="Prepare"`, 2},
		{"overclone_snapshotter_call_duration_seconds_count", `method="Commit"`, 1},
		{"overclone_snapshotter_call_duration_seconds_count", `method="Remove"`, 0},
		{"overclone_snapshotter_call_errors_total", `class="already_exists",method="Prepare"`, 1},
		{"overclone_snapshotter_call_errors_total", `class="not_found",method="Stat"`, 1},
		{"overclone_snapshots", `kind="committed"`, 1},
		{"overclone_snapshots", `kind="view"`, 1},
		{"overclone_snapshots", `kind="active"`, 0},
		// What overclone copies itself, never the kernel's copy-up.
		{"overclone_copied_bytes_total", `method="reflink",reason="flatten"`, 0},
		{"overclone_copied_bytes_total", `method="copy_file_range",reason="flatten"`, 0},
		{"overclone_copied_bytes_total", `method="copy",reason="materialize"`, 0},
		{"overclone_flattened_layer_build_seconds_count", "", 0},
		{"overclone_snapshots_unusable", "", 0},
	} {
		if got := s.value(want.name, want.labels); got != want.value {
			t.Errorf("%s{%s} = %v, want %v", want.name, want.labels, got, want.value)
		}
	}
	if size := s.value("overclone_metadata_db_bytes", ""); size <= 0 {
		t.Errorf("db size %v", size)
	}

	code, body := get(t, s.http, "http://overclone/healthz")
	if code != http.StatusOK || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	code, body = get(t, http.DefaultClient, "http://"+debugAddr+"/debug/pprof/")
	if code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Errorf("pprof index: %d %.200q", code, body)
	}
	// The metrics socket is root's only, like the gRPC socket.
	if out := socketMode(t, metricsSock); out != 0o660 {
		t.Errorf("metrics socket mode %o, want 660", out)
	}
}

// healthReuse is how long the daemon answers health checks with its last
// successful probe (snapshotter's healthReuse).
const healthReuse = 5 * time.Second

// TestHealthzFailsWhenRootReadOnly: /healthz says 503 with the reason, and
// the gRPC health service NOT_SERVING, while the root takes no new file
// (seen once the last success is older than healthReuse); 200 again at the
// next check once it does, as a failure is never reused.
func TestHealthzFailsWhenRootReadOnly(t *testing.T) {
	metricsSock := filepath.Join(t.TempDir(), "metrics.sock")
	d := daemon.Start(t, t.TempDir(), fmt.Sprintf("metrics_address = %q\n", "unix://"+metricsSock))
	c := unixHTTP(metricsSock)
	chattr(t, "+i", d.Root)
	start := time.Now()
	code, body := get(t, c, "http://overclone/healthz")
	for code == http.StatusOK && time.Since(start) < healthReuse+time.Second {
		time.Sleep(100 * time.Millisecond)
		code, body = get(t, c, "http://overclone/healthz")
	}
	grpcStatus, grpcErr := healthpb.NewHealthClient(d.Conn()).Check(context.Background(), &healthpb.HealthCheckRequest{})
	chattr(t, "-i", d.Root)
	if grpcErr != nil || grpcStatus.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("grpc.health.v1 on an immutable root: %v %v", grpcStatus, grpcErr)
	}
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "not writable") {
		t.Errorf("/healthz on an immutable root: %d %q", code, body)
	}
	if code, body := get(t, c, "http://overclone/healthz"); code != http.StatusOK {
		t.Errorf("/healthz once writable again: %d %q", code, body)
	}
}

func freeLoopbackPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
