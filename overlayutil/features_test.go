package overlayutil

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
)

func TestFeaturesLog(t *testing.T) {
	f := &Features{Root: "/r", KernelRelease: "6.18", BackingFS: "overlay", Checks: []Check{
		{Name: CheckOverlay, Reason: "root is itself on overlayfs"},
		{Name: CheckMaxLowers, OK: true, Value: "500"},
	}}
	var buf bytes.Buffer
	l := logrus.New()
	l.SetOutput(&buf)
	ctx := log.WithLogger(context.Background(), logrus.NewEntry(l))
	f.Log(ctx)
	out := buf.String()
	for _, want := range []string{"kernel=6.18", "backing_fs=overlay", "check=overlay", "root is itself on overlayfs",
		"check=max-lowers", "value=500", "level=warning", "cannot serve"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func TestStaleScratchRemoved(t *testing.T) {
	root := t.TempDir()
	old := filepath.Join(root, scratchPrefix+"1")
	fresh := filepath.Join(root, scratchPrefix+"2")
	for _, d := range []string{old, fresh} {
		if err := os.MkdirAll(filepath.Join(d, "l0"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	past := time.Now().Add(-2 * staleScratchAge)
	if err := os.Chtimes(old, past, past); err != nil {
		t.Fatal(err)
	}
	if err := removeStaleScratch(root); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Errorf("stale probe dir kept: %v", err)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Errorf("a recent probe dir, maybe another probe's, was removed: %v", err)
	}
}
