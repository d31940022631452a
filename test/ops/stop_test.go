package ops

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
)

// TestGracefulStop: SIGTERM lets a Commit in flight finish and the daemon
// exit cleanly, the layer committed; a second SIGTERM stops the daemon at
// once, and whatever the cut-off Commit did is all or nothing.
func TestGracefulStop(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	metricsSock := filepath.Join(t.TempDir(), "metrics.sock")
	// A shutdown timeout far beyond the test's: only a second signal may
	// stop the daemon early.
	// On ext4, which cannot reflink, whatever /tmp is: a flattening
	// that shares extents would finish before any signal.
	root := filepath.Join(loopfs.MountSize(t, loopfs.Ext4, 8<<30), "root")
	d := daemon.Start(t, root, fmt.Sprintf("metrics_address = %q\nshutdown_timeout = \"1h\"\n", "unix://"+metricsSock))
	s := scraper{t: t, http: unixHTTP(metricsSock)}

	t.Run("SIGTERM waits for the call in flight", func(t *testing.T) {
		sn := d.Client()
		prepareBig(ctx, t, sn, "big")
		done := make(chan error, 1)
		go func() { done <- sn.Commit(ctx, "big-committed", "big") }()
		if !s.waitInFlight("Commit", done) {
			t.Log("the Commit finished before the signal could land: the test shows only a clean stop")
		}
		signalled := time.Now()
		if err := d.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("Commit in flight at SIGTERM: %v\n%s", err, d.Log())
		}
		committedAfter := time.Since(signalled)
		if err := d.Wait(time.Minute); err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, d.Log())
		}
		t.Logf("the Commit returned %v after SIGTERM; the daemon then exited cleanly", committedAfter)
		if !strings.Contains(d.Log(), "msg=stopped") {
			t.Errorf("the daemon did not log its clean stop:\n%s", d.Log())
		}
		restart(t, d)
		info, err := d.Client().Stat(ctx, "big-committed")
		if err != nil || info.Kind != snapshots.KindCommitted {
			t.Fatalf("the layer committed during the stop: %+v %v", info, err)
		}
	})

	t.Run("a second signal stops at once", func(t *testing.T) {
		sn := d.Client()
		prepareBig(ctx, t, sn, "big2")
		done := make(chan error, 1)
		go func() { done <- sn.Commit(ctx, "big2-committed", "big2") }()
		if !s.waitInFlight("Commit", done) {
			t.Log("the Commit finished before the signals could land")
		}
		// The log is appended to across restarts: wait for one more
		// "finishing" line than before.
		stops := strings.Count(d.Log(), "finishing calls in flight")
		if err := d.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		waitLog(t, d, "finishing calls in flight", stops+1)
		if err := d.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		second := time.Now()
		if err := d.Wait(time.Minute); err != nil {
			t.Fatalf("exit after the second signal: %v\n%s", err, d.Log())
		}
		exited := time.Since(second)
		commitErr := <-done
		if commitErr != nil {
			t.Logf("the daemon exited %v after the second signal, cutting off the Commit: %v", exited, commitErr)
		} else {
			t.Logf("the Commit finished before the second signal took effect (exit %v after it)", exited)
		}
		restart(t, d)
		sn = d.Client()
		_, activeErr := sn.Stat(ctx, "big2")
		_, committedErr := sn.Stat(ctx, "big2-committed")
		switch {
		case activeErr == nil && errdefs.IsNotFound(committedErr):
			if commitErr == nil {
				t.Fatal("Commit returned success but the layer is not committed")
			}
		case committedErr == nil && errdefs.IsNotFound(activeErr):
		default:
			t.Fatalf("half a Commit: active %v, committed %v", activeErr, committedErr)
		}
	})
}

// TestSystemdNotify: with NOTIFY_SOCKET set, as systemd does for a
// Type=notify unit, the daemon says READY=1 once it serves and STOPPING=1
// on SIGTERM.
func TestSystemdNotify(t *testing.T) {
	dir := t.TempDir()
	notify := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	cmd := exec.Command(daemon.Binary(t), "--root", filepath.Join(dir, "root"), "--address", filepath.Join(dir, "overclone.sock"), "--config", filepath.Join(dir, "none.toml"))
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	os.WriteFile(filepath.Join(dir, "none.toml"), nil, 0o600)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()

	read := func(want string) {
		t.Helper()
		buf := make([]byte, 4096)
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %s: %v\n%s", want, err, out.String())
		}
		if got := string(buf[:n]); !strings.Contains(got, want) {
			t.Fatalf("notification %q, want %s", got, want)
		}
	}
	read("READY=1")
	// READY must mean serving: the socket answers now.
	if c, err := net.Dial("unix", filepath.Join(dir, "overclone.sock")); err != nil {
		t.Fatalf("READY=1 sent before the socket serves: %v", err)
	} else {
		c.Close()
	}
	cmd.Process.Signal(syscall.SIGTERM)
	read("STOPPING=1")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, out.String())
	}
}

func restart(t *testing.T, d *daemon.Daemon) {
	t.Helper()
	if err := d.Restart(); err != nil {
		t.Fatal(err)
	}
}

func waitLog(t *testing.T, d *daemon.Daemon, want string, count int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(d.Log(), want) < count {
		if time.Now().After(deadline) {
			t.Fatalf("daemon never logged %q:\n%s", want, d.Log())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestStopBoundedDuringFlatten: a View that builds a flattened layer runs
// that build for every caller waiting on it, past any one caller's
// cancellation; stopping the daemon must still cut it off. SIGTERM exits
// within shutdown_timeout plus 2 s (the daemon's stopGrace and
// closeTimeout, 1.5 s, with room for the process to exit), a second signal
// within 2 s, and a build cut off leaves no flattened layer behind: only a
// whole one is ever named.
func TestStopBoundedDuringFlatten(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	// Short, so that the cut-off lands early in the build.
	const shutdownTimeout = 100 * time.Millisecond
	metricsSock := filepath.Join(t.TempDir(), "metrics.sock")
	// max_stack = 2: a container on a stack of three layers mounts the
	// top one over the other two flattened, which is what a flattening
	// View builds (a stack that fits in one mount builds nothing).
	// On ext4, which cannot reflink, whatever /tmp is: a flattening
	// that shares extents would finish before any signal.
	root := filepath.Join(loopfs.MountSize(t, loopfs.Ext4, 8<<30), "root")
	d := daemon.Start(t, root, fmt.Sprintf("metrics_address = %q\nshutdown_timeout = %q\nmax_stack = 2\n", "unix://"+metricsSock, shutdownTimeout.String()))
	s := scraper{t: t, http: unixHTTP(metricsSock)}
	sn := d.Client()
	writeData(ctx, t, sn, "data", "data-committed")

	for _, tc := range []struct {
		name   string
		second bool          // send a second SIGTERM once the first is taken
		bound  time.Duration // from the last signal to the exit
	}{
		{"at the shutdown timeout", false, shutdownTimeout + 2*time.Second},
		{"at a second signal", true, 2 * time.Second},
	} {
		ok := t.Run(tc.name, func(t *testing.T) {
			sn := d.Client()
			// Two layers of its own on the data, so that each case
			// flattens the data and its middle layer anew.
			parent := "data-committed"
			for _, layer := range []string{"mid-", "top-"} {
				if _, err := sn.Prepare(ctx, layer+tc.name, parent); err != nil {
					t.Fatal(err)
				}
				parent = layer + "committed-" + tc.name
				if err := sn.Commit(ctx, parent, layer+tc.name); err != nil {
					t.Fatal(err)
				}
			}
			done := make(chan error, 1)
			go func() {
				_, err := sn.View(ctx, "flat-"+tc.name, "top-committed-"+tc.name, snapshots.WithLabels(map[string]string{snapshotter.FlattenLabel: "true"}))
				done <- err
			}()
			if !s.waitInFlight("View", done) {
				t.Fatalf("the flattening View finished before the signal: %v (make the layer bigger)", <-done)
			}
			stops := strings.Count(d.Log(), "finishing calls in flight")
			if err := d.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if tc.second {
				waitLog(t, d, "finishing calls in flight", stops+1)
				if err := d.Signal(syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
			}
			signalled := time.Now()
			if err := d.Wait(time.Minute); err != nil {
				t.Fatalf("exit: %v\n%s", err, d.Log())
			}
			if took := time.Since(signalled); took > tc.bound {
				t.Errorf("the daemon exited %v after the signal, want at most %v\n%s", took, tc.bound, d.Log())
			} else {
				t.Logf("exited %v after the signal", took)
			}
			if err := <-done; err == nil {
				t.Fatalf("the View returned success: the flattening finished before the stop (make the layer bigger)")
			}
			// A cut-off that lands in the build's final sync (it cannot
			// be interrupted) lets it finish: then, and only then, is
			// a layer named.
			built := strings.Count(d.Log(), "flattened layer built")
			if err := d.Restart(); err != nil {
				t.Fatalf("restart after the stop: %v", err)
			}
			ents, _ := os.ReadDir(filepath.Join(d.Root, "flat"))
			if len(ents) > built {
				t.Errorf("flat/ after a cut-off build and a restart: %v, but %d built", ents, built)
			}
			for _, e := range ents {
				wantWhole(t, filepath.Join(d.Root, "flat", e.Name()))
			}
		})
		if !ok {
			break // the daemon may not be running for the next case
		}
	}
}

// flattenFiles and flattenFileSize make a layer whose flattening copies
// 2 GiB: on a root without reflinks (ext4, as test roots are here) that
// takes several seconds, longer than any bound the stop test asserts.
const (
	flattenFiles    = 128
	flattenFileSize = 16 << 20
)

// writeData commits key as name with flattenFiles files of flattenFileSize.
func writeData(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, key, name string) {
	t.Helper()
	m, err := sn.Prepare(ctx, key, "")
	if err != nil {
		t.Fatal(err)
	}
	block := bytes.Repeat([]byte("overclone"), (1<<20)/9+1)[:1<<20]
	for i := range flattenFiles {
		f, err := os.Create(filepath.Join(m[0].Source, strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		for range flattenFileSize / len(block) {
			if _, err := f.Write(block); err != nil {
				t.Fatal(err)
			}
		}
		// On disk and out of the page cache, so that the flattening
		// reads it from the disk as it would an image unpacked long
		// ago: from the cache it copies several times faster, and how
		// much faster depends on the machine's memory.
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := sn.Commit(ctx, name, key); err != nil {
		t.Fatal(err)
	}
}

// wantWhole fails unless dir holds every file writeData wrote, whole.
func wantWhole(t *testing.T, dir string) {
	t.Helper()
	for i := range flattenFiles {
		fi, err := os.Stat(filepath.Join(dir, strconv.Itoa(i)))
		if err != nil || fi.Size() != flattenFileSize {
			t.Errorf("flattened layer %s is not whole: file %d: %v %v", dir, i, fi, err)
			return
		}
	}
}
