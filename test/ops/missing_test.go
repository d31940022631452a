package ops

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/test/daemon"
)

// TestMissingLayerOverGRPC: a layer whose directory vanished while the
// daemon was down is logged as an error at start, counted by the
// unusable-snapshots gauge, and refused over the socket with
// FailedPrecondition (the class survives the gRPC hop) and a message that
// says what to do.
func TestMissingLayerOverGRPC(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	metricsSock := filepath.Join(t.TempDir(), "metrics.sock")
	d := daemon.Start(t, t.TempDir(), fmt.Sprintf("metrics_address = %q\n", "unix://"+metricsSock))
	sn := d.Client()
	if _, err := sn.Prepare(ctx, "layer-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "layer", "layer-active"); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(d.Root, "snapshots", "1")); err != nil {
		t.Fatal(err)
	}
	restart(t, d)

	if !strings.Contains(d.Log(), "level=error") || !strings.Contains(d.Log(), "snapshot directory is missing") {
		t.Errorf("the missing layer was not reported at start:\n%s", d.Log())
	}
	s := scraper{t: t, http: unixHTTP(metricsSock)}
	if n := s.value("overclone_snapshots_unusable", ""); n != 1 {
		t.Errorf("unusable snapshots gauge %v, want 1", n)
	}
	_, err := d.Client().Prepare(ctx, "container", "layer")
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "pull its image again") {
		t.Fatalf("Prepare on a layer whose directory is gone: want FailedPrecondition saying what to do, got %v", err)
	}
	if err := d.Client().Remove(ctx, "layer"); err != nil {
		t.Fatal(err)
	}
	if n := s.value("overclone_snapshots_unusable", ""); n != 0 {
		t.Errorf("unusable snapshots gauge after removing it: %v", n)
	}
}
