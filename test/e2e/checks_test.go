package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/image/view"
	"golang.org/x/sys/unix"
)

// The checks, in the order a user meets them.

// importRounds is how often each snapshotter's import and pull are timed;
// the order of the snapshotters alternates between rounds.
const importRounds = 3

func (s *suite) testImport(t *testing.T) {
	for round := 0; round < importRounds; round++ {
		if round > 0 {
			s.removeImages(t)
		}
		// Content first, so the timed imports below measure the unpack
		// into each snapshotter and not who copied the blobs in first.
		s.ctr(t, "images", "import", "--no-unpack", s.f.archive)
		for _, sn := range alternate(s.sns, round) {
			t.Run(fmt.Sprintf("%s-%d", sn, round), func(t *testing.T) {
				s.timed(t, "import (unpack)", sn, "images", "import", "--snapshotter", sn, s.f.archive)
				s.requireUnpacked(t, sn)
			})
		}
	}
}

func (s *suite) testRun(t *testing.T) {
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			for i := 0; i < 3; i++ {
				s.runView(t, sn, imageName, fmt.Sprintf("view-%s-%d", sn, i), "run --rm (view)")
			}
		})
	}
}

func (s *suite) testWrite(t *testing.T) {
	want := expectedAfterWrite(t, s.f.img.Expected)
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			before := s.usage(t, sn, s.chainIDs()...)
			got := s.runViewer(t, sn, imageName, "write-"+sn, "", "write")
			compareView(t, "container's view after its writes", got, want)
			// The image's layers are unchanged: a new container sees
			// the image as built, and the committed snapshots kept
			// their sizes.
			s.runView(t, sn, imageName, "after-write-"+sn, "")
			if after := s.usage(t, sn, s.chainIDs()...); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Errorf("layer usage changed by a container's writes: before %v, after %v", before, after)
			}
		})
	}
}

// testSnapshotView mounts a read-only view of the top layer outside any
// container and checks it: the committed chain itself is right.
func (s *suite) testSnapshotView(t *testing.T) {
	ids := s.chainIDs()
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			key, ms := s.view(t, sn, "e2e-view-"+sn, ids[len(ids)-1])
			target := filepath.Join(s.dir, "view-"+sn)
			if err := os.Mkdir(target, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := harness.MountAt(ms, target); err != nil {
				t.Fatal(err)
			}
			entries, err := view.Read(filepath.Join(target, image.DataDir))
			if uerr := unix.Unmount(target, 0); uerr != nil {
				t.Error(uerr)
			}
			if err != nil {
				t.Fatal(err)
			}
			compareView(t, "view snapshot of the top layer", view.Format(entries), s.f.img.Expected)
			s.ctr(t, "snapshots", "--snapshotter", sn, "rm", key)
		})
	}
}

func (s *suite) testSnapshotsCLI(t *testing.T) {
	ids := s.chainIDs()
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			s.requireUnpacked(t, sn)
			sizes := s.usage(t, sn, ids...)
			if sizes[1] < image.BigSize {
				t.Errorf("usage of the layer holding the %d-byte file: %d", image.BigSize, sizes[1])
			}
			key := "e2e-active-" + sn
			s.ctr(t, "snapshots", "--snapshotter", sn, "prepare", key, ids[len(ids)-1])
			if rows := s.snapshots(t, sn); rows[key].kind != "Active" || rows[key].parent != ids[len(ids)-1] {
				t.Errorf("prepared %s: %+v", key, rows[key])
			}
			// An overlay active starts as an empty upper dir; a
			// userspace one is a complete copy of its parent, which
			// costs real blocks where the filesystem cannot reflink.
			n := s.usage(t, sn, key)[0]
			switch {
			case sn == harness.UserspaceName:
				t.Logf("%s: a fresh active snapshot of the image uses %d bytes", sn, n)
			case n > 1<<20:
				t.Errorf("fresh active snapshot uses %d bytes", n)
			}
			s.ctr(t, "snapshots", "--snapshotter", sn, "rm", key)
			if _, ok := s.snapshots(t, sn)[key]; ok {
				t.Errorf("%s still listed after rm", key)
			}
			// A layer with children cannot go (containerd's GC relies
			// on the snapshotter refusing).
			ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
			defer cancel()
			if _, err := s.c.Ctr(ctx, "snapshots", "--snapshotter", sn, "rm", ids[0]); err == nil {
				t.Errorf("rm of the bottom layer under 3 children succeeded")
			}
			s.requireUnpacked(t, sn)
		})
	}
}

func (s *suite) testPush(t *testing.T) {
	s.ref = fmt.Sprintf("%s/overclone/e2e-%d:1", s.f.registry.Host, s.c.Major)
	s.ctr(t, "images", "tag", imageName, s.ref)
	s.ctr(t, "images", "push", "--plain-http", s.ref)
	s.ctr(t, "images", "rm", s.ref)
}

// testRestart stops each overclone daemon with SIGTERM while a container
// on it runs, checks the container does not notice, starts the daemon again
// and starts new containers.
func (s *suite) testRestart(t *testing.T) {
	for _, p := range s.proxies {
		t.Run(p.Name, func(t *testing.T) { s.restart(t, p) })
	}
}

func (s *suite) restart(t *testing.T, p harness.Proxy) {
	sn, oc, id := p.Name, p.Overclone, "sleeper-"+p.Name
	// The execs below write their views to files in o, as runViewer's
	// containers do. The sleeper's "ready" is read by nobody: the test
	// waits for the task to be RUNNING instead (requireRunning).
	o := s.viewerOut(t, id)
	args := append([]string{"run", "-d"}, o.MountFlags()...)
	s.ctr(t, append(args, "--snapshotter", sn, imageName, id, "/bin/viewer", "sleep")...)
	execView := func(execID, cmd string) string {
		t.Helper()
		name := execID + ".txt"
		out := s.ctr(t, append([]string{"tasks", "exec", "--exec-id", execID, id}, o.Command(cmd, name)...)...)
		return s.readView(t, o, name, out)
	}
	defer s.removeContainer(t, id)
	s.requireRunning(t, id)
	// The running container writes into its snapshot before, and reads
	// it during and after overclone's restart.
	written := expectedAfterWrite(t, s.f.img.Expected)
	compareView(t, "exec write before the restart", execView("before-stop", "write"), written)

	s.checkHealthCLI(t, oc, true)
	if err := oc.Stop(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	s.checkHealthCLI(t, oc, false)
	s.requireRunning(t, id)
	compareView(t, "exec while overclone is down", execView("while-down", "view"), written)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	s.requireRunning(t, id)
	compareView(t, "exec after the restart", execView("after-restart", "view"), written)
	s.checkHealthCLI(t, oc, true)
	s.waitReconnect(t, sn)
	s.runView(t, sn, imageName, "after-restart-"+sn, "")
	s.requireUnpacked(t, sn)
	// The restarted daemon still knows the running container's snapshot.
	if rows := s.snapshots(t, sn); rows[id].kind != "Active" {
		t.Errorf("the running container's snapshot after the restart: %+v", rows[id])
	}
}

// reconnectTimeout bounds how long containerd may take to use a restarted
// overclone. Its proxy client redials with gRPC backoff capped at 3 s
// (containerd 1.6 and 2.x alike), and a dial made while the socket was
// gone waits out its own timeout first.
const reconnectTimeout = 30 * time.Second

// waitReconnect waits until containerd's calls reach the restarted daemon
// again and logs how long that took: until then pulls and container starts
// that need the snapshotter fail with "unavailable", which kubelet and
// containerd's clients retry.
func (s *suite) waitReconnect(t *testing.T, sn string) {
	t.Helper()
	start := time.Now()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
		_, err := s.c.Ctr(ctx, "snapshots", "--snapshotter", sn, "ls")
		cancel()
		if err == nil {
			break
		}
		if time.Since(start) > reconnectTimeout {
			t.Fatalf("containerd still cannot reach %s %s after its restart: %v", sn, reconnectTimeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("containerd reached the restarted %s after %s", sn, time.Since(start).Round(time.Millisecond))
}

// checkHealthCLI runs `overclone health --address SOCKET`, the probe
// deploy/kubernetes and hack/wait-overclone.sh use: exit 0 while the daemon
// serves, non-zero while it is down.
func (s *suite) checkHealthCLI(t *testing.T, oc *harness.Overclone, serving bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.f.cliBin, "health", "--address", oc.Socket).CombinedOutput()
	if serving && err != nil {
		t.Errorf("overclone health while serving: %v: %s", err, out)
	}
	if !serving && err == nil {
		t.Errorf("overclone health succeeded while the daemon is down: %s", out)
	}
}

// testGC removes every image and checks that containerd's collector
// removed the snapshots from the lists and from disk: the 64 MiB layer
// alone would exceed the bound below, and `overclone gc --dry-run` finds
// no orphans. overclone empties its trash in the background, so both are
// polled for a while.
func (s *suite) testGC(t *testing.T) {
	for _, p := range s.proxies {
		// The measure itself: with the image unpacked, the root holds
		// at least the 64 MiB file.
		if used := diskUsage(t, p.Overclone.Root); used < image.BigSize {
			t.Fatalf("%s root uses %d bytes with the image unpacked: the measure is broken", p.Name, used)
		}
	}
	s.removeImages(t)
	for _, p := range s.proxies {
		var used int64
		var orphans string
		for i := 0; i < 50; i++ {
			used, orphans = diskUsage(t, p.Overclone.Root), s.orphans(t, p.Overclone)
			if used <= 8<<20 && strings.Contains(orphans, "\n0 orphans") {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if used > 8<<20 {
			t.Errorf("%s root still uses %d bytes after GC", p.Name, used)
		}
		if !strings.Contains(orphans, "\n0 orphans") {
			t.Errorf("%s: overclone gc --dry-run after GC:\n%s", p.Name, orphans)
		}
		t.Logf("%s after GC: %d bytes on disk, overclone gc --dry-run: %s", p.Name, used, lastLine(orphans))
	}
}

// orphans runs `overclone gc --dry-run` against the daemon.
func (s *suite) orphans(t *testing.T, oc *harness.Overclone) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.f.cliBin, "gc", "--dry-run", "--address", oc.Socket, "--root", oc.Root).CombinedOutput()
	if err != nil {
		t.Fatalf("overclone gc --dry-run: %v: %s", err, out)
	}
	return "\n" + string(out)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// diskUsage sums the allocated blocks under root.
func diskUsage(t *testing.T, root string) int64 {
	t.Helper()
	var used int64
	err := filepath.Walk(root, func(path string, fi os.FileInfo, err error) error {
		// overclone's deleter empties the trash while this walks it:
		// what is gone by the time it is read takes no room.
		if os.IsNotExist(err) {
			return nil
		}
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			used += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return used
}

// testPull pulls the pushed image into each snapshotter from an empty
// store (fetch and unpack), runs it and removes it again. containerd 2.x
// pulls through the transfer service by default and client-side with
// --local (the path nerdctl takes); 1.6 always pulls client-side.
func (s *suite) testPull(t *testing.T) {
	if s.ref == "" {
		t.Skip("push failed")
	}
	modes := [][]string{nil}
	if s.c.Major >= 2 {
		modes = append(modes, []string{"--local"})
	}
	for _, mode := range modes {
		for round := 0; round < importRounds; round++ {
			for _, sn := range alternate(s.sns, round) {
				name, op := fmt.Sprintf("%s-%d", sn, round), "pull (fetch + unpack)"
				if len(mode) > 0 {
					name, op = fmt.Sprintf("%s-local-%d", sn, round), "pull --local (fetch + unpack)"
				}
				t.Run(name, func(t *testing.T) {
					args := append(append([]string{"images", "pull"}, mode...), "--plain-http", "--snapshotter", sn, s.ref)
					s.timed(t, op, sn, args...)
					s.requireUnpacked(t, sn)
					if round == 0 {
						s.runView(t, sn, s.ref, "pulled-"+name, "")
					}
					s.removeImages(t)
				})
			}
		}
	}
}

// alternate returns sns, reversed on odd rounds, so that no snapshotter
// always runs first (or last) in a series of timed runs.
func alternate(sns []string, round int) []string {
	order := append([]string(nil), sns...)
	if round%2 == 1 {
		for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
			order[i], order[j] = order[j], order[i]
		}
	}
	return order
}

// testImportLocal: containerd 2.x imports through the transfer service by
// default; --local takes the client-side path 1.6 always takes.
func (s *suite) testImportLocal(t *testing.T) {
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			s.timed(t, "import --local (ingest + unpack)", sn, "images", "import", "--local", "--snapshotter", sn, s.f.archive)
			s.requireUnpacked(t, sn)
			s.runView(t, sn, imageName, "local-"+sn, "")
			s.removeImages(t)
		})
	}
}

// removeContainer kills the task of container id, waits for it to be gone
// and removes the container (its snapshot with it).
func (s *suite) removeContainer(t *testing.T, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	_, _ = s.c.Ctr(ctx, "tasks", "kill", "-s", "SIGKILL", id)
	for i := 0; i < 50; i++ {
		if _, err := s.c.Ctr(ctx, "tasks", "rm", id); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := s.c.Ctr(ctx, "containers", "rm", id); err != nil {
		t.Error(err)
	}
}
