package snapshotter

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
)

// captureLog returns a context whose log.G writes into the returned buffer.
func captureLog(ctx context.Context) (context.Context, *bytes.Buffer) {
	var buf bytes.Buffer
	l := logrus.New()
	l.SetOutput(&buf)
	l.SetLevel(logrus.DebugLevel)
	return log.WithLogger(ctx, logrus.NewEntry(l)), &buf
}

// TestRootCreateOrCheck: a root New creates is 0700 (it holds every
// image's files); a root that exists keeps its mode, whatever it is, as
// the daemon keeps an existing socket directory's: a --root typo naming
// /var/lib or a home directory must not lock everyone else out of it. An
// open one is warned about.
func TestRootCreateOrCheck(t *testing.T) {
	t.Run("created 0700", func(t *testing.T) {
		root := filepath.Join(t.TempDir(), "a", "root")
		openTest(t, root)
		fi, err := os.Stat(root)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o700 {
			t.Errorf("new root is %o, want 700", fi.Mode().Perm())
		}
	})
	t.Run("existing open root kept, with a warning", func(t *testing.T) {
		root := t.TempDir()
		if err := os.Chmod(root, 0o755); err != nil {
			t.Fatal(err)
		}
		ctx, logs := captureLog(context.Background())
		s, err := New(ctx, root)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		fi, err := os.Stat(root)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o755 {
			t.Errorf("existing root made %o, want it left 755", fi.Mode().Perm())
		}
		if !strings.Contains(logs.String(), "level=warning") || !strings.Contains(logs.String(), "root is open to others") {
			t.Errorf("no warning about an open root:\n%s", logs)
		}
	})
	t.Run("existing closed root, no warning", func(t *testing.T) {
		root := t.TempDir()
		if err := os.Chmod(root, 0o700); err != nil {
			t.Fatal(err)
		}
		ctx, logs := captureLog(context.Background())
		s, err := New(ctx, root)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		if strings.Contains(logs.String(), "open to others") {
			t.Errorf("warned about a 0700 root:\n%s", logs)
		}
	})
}
