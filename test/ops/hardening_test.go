package ops

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/overclone/overclone/test/daemon"
)

// TestOversizedMessage: a request over gRPC's receive limit (here 1300
// labels that each pass containerd's 4 KiB limit, 5 MiB in all) is refused
// with ResourceExhausted that says why, and changes nothing.
func TestOversizedMessage(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	d := daemon.Start(t, t.TempDir(), "")
	labels := map[string]string{}
	for i := 0; i < 1300; i++ {
		labels["containerd.io/snapshot/l"+strconv.Itoa(i)] = strings.Repeat("x", 4000)
	}
	client := snapshotsapi.NewSnapshotsClient(d.Conn())
	_, err := client.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{Snapshotter: "overclone", Key: "huge", Labels: labels})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "larger than max") {
		t.Fatalf("5 MiB request: want ResourceExhausted naming the limit, got %v", err)
	}
	sn := d.Client()
	if _, err := sn.Stat(ctx, "huge"); !errdefs.IsNotFound(err) {
		t.Fatalf("the refused request left something: %v", err)
	}
	// The connection and the daemon still serve.
	if _, err := sn.Prepare(ctx, "small", ""); err != nil {
		t.Fatal(err)
	}
}

// TestClientGoneMidCommit: a client that gives up (its context cancelled,
// as when containerd's caller goes away) during a big Commit gets a clear
// error, and the Commit either did not happen or happened whole: the
// active is there and the name is not, or the other way round.
func TestClientGoneMidCommit(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	metricsSock := filepath.Join(t.TempDir(), "metrics.sock")
	d := daemon.Start(t, t.TempDir(), fmt.Sprintf("metrics_address = %q\n", "unix://"+metricsSock))
	s := scraper{t: t, http: unixHTTP(metricsSock)}
	sn := d.Client()

	key, outcomes := "", map[string]int{}
	// The committed snapshots the run must end with, and no active.
	want := map[string]bool{}
	// From a cancel as soon as the daemon has the call to one after it
	// is likely done.
	for i, delay := range []time.Duration{0, 20 * time.Millisecond, 80 * time.Millisecond, 2 * time.Second} {
		if key == "" {
			key = "big-" + strconv.Itoa(i)
			prepareBig(ctx, t, sn, key)
		}
		name := fmt.Sprintf("committed-%d", i)
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- sn.Commit(cctx, name, key) }()
		s.waitInFlight("Commit", done)
		time.Sleep(delay)
		cancel()
		err := <-done
		// The daemon may still be finishing (a syncfs does not stop for
		// a cancel): judge the state once it is done.
		waitIdle(t, s, "Commit")

		_, activeErr := sn.Stat(ctx, key)
		_, committedErr := sn.Stat(ctx, name)
		switch {
		case err != nil && !errors.Is(err, context.Canceled) && status.Code(err) != codes.Canceled:
			t.Errorf("cancel after %v: want Canceled or success, got %v", delay, err)
		case activeErr == nil && errdefs.IsNotFound(committedErr):
			if err == nil {
				t.Fatalf("cancel after %v: Commit succeeded but nothing was committed", delay)
			}
			outcomes["not done"]++
		case committedErr == nil && errdefs.IsNotFound(activeErr):
			outcomes["done whole"]++
			want[name] = true
			key = ""
		default:
			t.Fatalf("cancel after %v left half a Commit: active %v, committed %v", delay, activeErr, committedErr)
		}
		t.Logf("cancel %v after the Commit reached the daemon: client got %v", delay, err)
	}
	t.Logf("outcomes: %v", outcomes)
	if key != "" {
		if err := sn.Commit(ctx, "finally", key); err != nil {
			t.Fatalf("the active a cancelled Commit left cannot be committed: %v", err)
		}
		want["finally"] = true
	}
	got := map[string]bool{}
	err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if info.Kind != snapshots.KindCommitted {
			t.Errorf("%s is left %s", info.Name, info.Kind)
		}
		got[info.Name] = true
		return nil
	})
	if err != nil {
		t.Fatalf("walk: %v", err)
	}
	if !maps.Equal(got, want) {
		t.Fatalf("snapshots after the cancelled Commits: %v, want %v", slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
	}
}

func waitIdle(t *testing.T, s scraper, method string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for s.value("overclone_snapshotter_calls_in_flight", `method="`+method+`"`) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s still in flight after a minute", method)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
