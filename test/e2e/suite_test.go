package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/image/view"
	"golang.org/x/sys/unix"
)

// suite is one containerd (with its overclone) under test. Every check runs
// for the built-in overlayfs snapshotter too: it is the reference the
// expected view is checked against, and the timing baseline.
type suite struct {
	f     *fixture
	dir   string
	c     *harness.Containerd
	oc    *harness.Overclone // nil until the daemon is in the tree
	sns   []string           // snapshotters under test, overlayfs first
	label string             // containerd version, for timings
	ref   string             // the image in the local registry, once pushed
}

// ctrTimeout bounds one ctr command; the slowest is a 64 MiB unpack.
const ctrTimeout = 2 * time.Minute

func newSuite(t *testing.T, binDir string, opts harness.ContainerdOptions) *suite {
	t.Helper()
	f := getFixture(t)
	if m := harness.Missing(binDir, harness.ContainerdTools...); m != "" {
		t.Skipf("containerd missing: %s (make containerd2 builds 2.x)", m)
	}
	dir, err := harness.TempDir("oc-")
	if err != nil {
		t.Fatal(err)
	}
	s := &suite{f: f, dir: dir, sns: []string{"overlayfs"}}
	t.Cleanup(func() { s.close(t) })

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if f.overcloneBin != "" {
		if err := os.Mkdir(filepath.Join(dir, "oc"), 0o700); err != nil {
			t.Fatal(err)
		}
		if s.oc, err = harness.NewOverclone(f.overcloneBin, filepath.Join(dir, "oc"), t.Logf); err != nil {
			t.Fatal(err)
		}
		if err := s.oc.Start(ctx); err != nil {
			t.Fatal(err)
		}
		opts.Overclone = s.oc
		s.sns = append(s.sns, harness.SnapshotterName)
	}
	opts.BinDir = binDir
	if err := os.Mkdir(filepath.Join(dir, "ctd"), 0o700); err != nil {
		t.Fatal(err)
	}
	if s.c, err = harness.StartContainerd(ctx, filepath.Join(dir, "ctd"), opts, t.Logf); err != nil {
		t.Fatal(err)
	}
	s.label = s.c.Version
	return s
}

// close stops containerd (removing what a failed test left), then overclone,
// and removes the dir. On failure it shows the daemons' last log lines.
func (s *suite) close(t *testing.T) {
	if s.c != nil {
		if t.Failed() {
			t.Logf("containerd log:\n%s", s.c.Tail(40))
		}
		if err := s.c.Stop(); err != nil {
			t.Error(err)
		}
	}
	if s.oc != nil {
		if t.Failed() {
			t.Logf("overclone log:\n%s", s.oc.Tail(40))
		}
		if err := s.oc.Stop(); err != nil {
			t.Error(err)
		}
	}
	if err := harness.UnmountUnder(s.dir); err != nil {
		t.Error(err)
	}
	if err := os.RemoveAll(s.dir); err != nil {
		t.Error(err)
	}
}

func (s *suite) ctr(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	out, err := s.c.Ctr(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// timed runs ctr after a sync, so that the run does not pay for writing back
// what an earlier step left dirty in the page cache, and records the time.
func (s *suite) timed(t *testing.T, op, sn string, args ...string) string {
	t.Helper()
	unix.Sync()
	start := time.Now()
	out := s.ctr(t, args...)
	d := time.Since(start)
	timings.Add(s.label, op, sn, d)
	t.Logf("%s %s: %s", op, sn, d.Round(time.Millisecond))
	return out
}

func (s *suite) requireOverclone(t *testing.T) {
	t.Helper()
	if s.oc == nil {
		t.Skip(s.f.noOverclone)
	}
}

func (s *suite) chainIDs() []string {
	var ids []string
	for _, d := range s.f.img.ChainIDs() {
		ids = append(ids, d.String())
	}
	return ids
}

// snapshot is one row of `ctr snapshots ls`.
type snapshot struct{ key, parent, kind string }

func (s *suite) snapshots(t *testing.T, sn string) map[string]snapshot {
	t.Helper()
	out := s.ctr(t, "snapshots", "--snapshotter", sn, "ls")
	rows := map[string]snapshot{}
	for i, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) == 0 {
			continue // header
		}
		switch len(f) {
		case 2: // no parent
			rows[f[0]] = snapshot{key: f[0], kind: f[1]}
		default:
			rows[f[0]] = snapshot{key: f[0], parent: f[1], kind: f[len(f)-1]}
		}
	}
	return rows
}

// requireUnpacked checks that sn holds the image's layers as a committed
// chain.
func (s *suite) requireUnpacked(t *testing.T, sn string) {
	t.Helper()
	rows := s.snapshots(t, sn)
	parent := ""
	for i, id := range s.chainIDs() {
		r, ok := rows[id]
		switch {
		case !ok:
			t.Fatalf("%s: layer %d (%s) not unpacked; snapshots: %v", sn, i+1, id, rows)
		case r.kind != "Committed":
			t.Fatalf("%s: layer %d is %s, not Committed", sn, i+1, r.kind)
		case r.parent != parent:
			t.Fatalf("%s: layer %d has parent %q, want %q", sn, i+1, r.parent, parent)
		}
		parent = id
	}
}

// compareView fails with the lines that differ and names the snapshotter
// rule each known path stands for.
func compareView(t testing.TB, what, got, want string) {
	t.Helper()
	if got == want {
		return
	}
	rules := map[string]string{
		strings.TrimPrefix(image.WhiteoutFile, "data/"): "whiteout (.wh.) not honoured",
		strings.TrimPrefix(image.WhiteoutDir, "data/"):  "a dir recreated over a whiteout is not opaque",
		strings.TrimPrefix(image.OpaqueLower, "data/"):  "opaque dir (.wh..wh..opq) not honoured",
		strings.TrimPrefix(image.CapFile, "data/"):      "security.capability lost or changed",
	}
	gotLines, wantLines := lineSet(got), lineSet(want)
	var msg strings.Builder
	for _, l := range strings.Split(want, "\n") {
		if l != "" && !gotLines[l] {
			fmt.Fprintf(&msg, "  missing: %s\n", l)
		}
	}
	for _, l := range strings.Split(got, "\n") {
		if l != "" && !wantLines[l] {
			fmt.Fprintf(&msg, "  extra:   %s\n", l)
		}
	}
	for path, rule := range rules {
		for _, l := range strings.Split(msg.String(), "\n") {
			if strings.HasPrefix(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "extra:")), path+" ") ||
				strings.HasPrefix(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "missing:")), path+" ") {
				fmt.Fprintf(&msg, "  => %s: %s\n", path, rule)
				break
			}
		}
	}
	t.Errorf("%s: view differs from the image model:\n%s", what, msg.String())
}

func lineSet(s string) map[string]bool {
	m := map[string]bool{}
	for _, l := range strings.Split(s, "\n") {
		m[l] = true
	}
	return m
}

// runView runs a container that prints the image's view and checks it.
func (s *suite) runView(t *testing.T, sn, ref, id string, op string) {
	t.Helper()
	args := []string{"run", "--rm", "--snapshotter", sn, ref, id}
	var out string
	if op != "" {
		out = s.timed(t, op, sn, args...)
	} else {
		out = s.ctr(t, args...)
	}
	compareView(t, fmt.Sprintf("ctr run --snapshotter %s %s", sn, ref), out, s.f.img.Expected)
}

// --- the checks, in the order a user meets them ---

// importRounds is how often each snapshotter's import is timed; the order
// of the snapshotters alternates between rounds.
const importRounds = 3

func (s *suite) testImport(t *testing.T) {
	for round := 0; round < importRounds; round++ {
		if round > 0 {
			s.removeImages(t)
		}
		// Content first, so the timed imports below measure the unpack
		// into each snapshotter and not who copied the blobs in first.
		s.ctr(t, "images", "import", "--no-unpack", s.f.archive)
		order := append([]string(nil), s.sns...)
		if round%2 == 1 {
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, sn := range order {
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
				s.runView(t, sn, imageName, fmt.Sprintf("view-%s-%d", sn, i), "run --rm (print view)")
			}
		})
	}
}

// expectedAfterWrite is the view `viewer write` prints: the image's view
// with the container's changes.
func expectedAfterWrite(t *testing.T, expected string) string {
	t.Helper()
	digest := func(s string) string {
		d, err := view.Digest(strings.NewReader(s))
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	appended := image.AppendContent + view.AppendLine
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(expected), "\n") {
		path := strings.Fields(l)[0]
		switch path {
		case view.RemovedFile:
			continue
		case view.AppendFile:
			l = view.Entry{Path: path, Type: 'f', Mode: 0o644, Size: int64(len(appended)), SHA256: digest(appended)}.String()
		case view.ChmodFile:
			l = strings.Replace(l, " 0644 ", " 0600 ", 1)
		}
		lines = append(lines, l)
	}
	lines = append(lines,
		view.Entry{Path: view.CreatedDir, Type: 'd', Mode: 0o755}.String(),
		view.Entry{Path: view.CreatedFile, Type: 'f', Mode: 0o644, Size: int64(len(view.CreatedContent)), SHA256: digest(view.CreatedContent)}.String(),
	)
	return sortLines(lines)
}

func sortLines(lines []string) string {
	// The view sorts by path; paths are the first field and never
	// contain spaces in the test image.
	sorted := append([]string(nil), lines...)
	for i := 1; i < len(sorted); i++ {
		for j := i; j > 0 && strings.Fields(sorted[j])[0] < strings.Fields(sorted[j-1])[0]; j-- {
			sorted[j], sorted[j-1] = sorted[j-1], sorted[j]
		}
	}
	return strings.Join(sorted, "\n") + "\n"
}

func (s *suite) testWrite(t *testing.T) {
	want := expectedAfterWrite(t, s.f.img.Expected)
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			before := s.usage(t, sn, s.chainIDs()...)
			out := s.ctr(t, "run", "--rm", "--snapshotter", sn, imageName, "write-"+sn, "/bin/viewer", "write", "/data")
			compareView(t, "container's view after its writes", out, want)
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

// usage returns `ctr snapshots usage -b` sizes of keys.
func (s *suite) usage(t *testing.T, sn string, keys ...string) []int64 {
	t.Helper()
	out := s.ctr(t, append([]string{"snapshots", "--snapshotter", sn, "usage", "-b"}, keys...)...)
	sizes := map[string]int64{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("usage line %q: %v", line, err)
		}
		sizes[f[0]] = n
	}
	var res []int64
	for _, k := range keys {
		n, ok := sizes[k]
		if !ok {
			t.Fatalf("usage has no %s:\n%s", k, out)
		}
		res = append(res, n)
	}
	return res
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

// view creates a view snapshot of parent and returns its key and mounts.
// `ctr snapshots view`, unlike prepare, sets no gc.root label, so
// containerd's collector may take the view before the label below lands;
// then it tries again under a new key.
func (s *suite) view(t *testing.T, sn, key, parent string) (string, []harness.Mount) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	for i := 0; ; i++ {
		k := fmt.Sprintf("%s-%d", key, i)
		out := s.ctr(t, "snapshots", "--snapshotter", sn, "view", "--mounts", k, parent)
		_, err := s.c.Ctr(ctx, "snapshots", "--snapshotter", sn, "label", k, "containerd.io/gc.root="+time.Now().UTC().Format(time.RFC3339))
		if err != nil && i < 3 && strings.Contains(err.Error(), "not found") {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		ms, err := harness.ParseMounts(out)
		if err != nil {
			t.Fatal(err)
		}
		return k, ms
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
			if n := s.usage(t, sn, key)[0]; n > 1<<20 {
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

// testRestart stops overclone with SIGTERM while a container runs, checks
// the container does not notice, starts overclone again and starts new
// containers.
func (s *suite) testRestart(t *testing.T) {
	s.requireOverclone(t)
	sn := harness.SnapshotterName
	s.ctr(t, "run", "-d", "--snapshotter", sn, imageName, "sleeper", "/bin/viewer", "sleep")
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
		defer cancel()
		_, _ = s.c.Ctr(ctx, "tasks", "kill", "-s", "SIGKILL", "sleeper")
		for i := 0; i < 50; i++ {
			if _, err := s.c.Ctr(ctx, "tasks", "rm", "sleeper"); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := s.c.Ctr(ctx, "containers", "rm", "sleeper"); err != nil {
			t.Error(err)
		}
	}()
	s.requireRunning(t, "sleeper")
	// The running container writes into its snapshot before, and reads
	// it during and after overclone's restart.
	written := expectedAfterWrite(t, s.f.img.Expected)
	out := s.ctr(t, "tasks", "exec", "--exec-id", "before-stop", "sleeper", "/bin/viewer", "write", "/data")
	compareView(t, "exec write before the restart", out, written)

	s.checkHealthCLI(t, true)
	if err := s.oc.Stop(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	s.checkHealthCLI(t, false)
	s.requireRunning(t, "sleeper")
	out = s.ctr(t, "tasks", "exec", "--exec-id", "while-down", "sleeper", "/bin/viewer", "view", "/data")
	compareView(t, "exec while overclone is down", out, written)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	s.requireRunning(t, "sleeper")
	out = s.ctr(t, "tasks", "exec", "--exec-id", "after-restart", "sleeper", "/bin/viewer", "view", "/data")
	compareView(t, "exec after the restart", out, written)
	s.checkHealthCLI(t, true)
	s.runView(t, sn, imageName, "after-restart", "")
	s.requireUnpacked(t, sn)
	// The restarted daemon still knows the running container's snapshot.
	if rows := s.snapshots(t, sn); rows["sleeper"].kind != "Active" {
		t.Errorf("the running container's snapshot after the restart: %+v", rows["sleeper"])
	}
}

// checkHealthCLI runs `overclone health --address SOCKET`, the probe
// deploy/kubernetes and hack/wait-overclone.sh use: exit 0 while the daemon
// serves, non-zero while it is down. Until the admin tool has the
// subcommand, it says so in the log and checks nothing.
func (s *suite) checkHealthCLI(t *testing.T, serving bool) {
	t.Helper()
	if s.f.cliBin == "" {
		t.Log("no cmd/overclone yet: health probe not checked")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.f.cliBin, "health", "--address", s.oc.Socket).CombinedOutput()
	if strings.Contains(string(out), `unknown command "health"`) {
		t.Log("overclone has no health subcommand yet: probe not checked")
		return
	}
	if serving && err != nil {
		t.Errorf("overclone health while serving: %v: %s", err, out)
	}
	if !serving && err == nil {
		t.Errorf("overclone health succeeded while the daemon is down: %s", out)
	}
}

func (s *suite) requireRunning(t *testing.T, id string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		for _, line := range strings.Split(s.ctr(t, "tasks", "ls"), "\n") {
			if f := strings.Fields(line); len(f) == 3 && f[0] == id && f[2] == "RUNNING" {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("task %s not running:\n%s", id, s.ctr(t, "tasks", "ls"))
}

// removeImages removes every image with --sync, which waits for
// containerd's garbage collector, and checks the snapshotters are empty.
func (s *suite) removeImages(t *testing.T) {
	t.Helper()
	if names := strings.Fields(s.ctr(t, "images", "ls", "-q")); len(names) > 0 {
		s.ctr(t, append([]string{"images", "rm", "--sync"}, names...)...)
	}
	for _, sn := range s.sns {
		if rows := s.snapshots(t, sn); len(rows) > 0 {
			t.Errorf("%s: snapshots left after images rm --sync: %v", sn, rows)
		}
	}
}

func (s *suite) testGC(t *testing.T) {
	s.removeImages(t)
	if s.oc != nil {
		// The snapshot data is gone from disk too, not only from the
		// lists: the 64 MiB layer alone would exceed this.
		var used int64
		err := filepath.Walk(s.oc.Root, func(p string, fi os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			if st, ok := fi.Sys().(*unix.Stat_t); ok {
				used += st.Blocks * 512
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if used > 8<<20 {
			t.Errorf("overclone root still uses %d bytes after GC", used)
		}
	}
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
		for _, sn := range s.sns {
			name, op := sn, "pull (fetch + unpack)"
			if len(mode) > 0 {
				name, op = sn+"-local", "pull --local (fetch + unpack)"
			}
			t.Run(name, func(t *testing.T) {
				args := append(append([]string{"images", "pull"}, mode...), "--plain-http", "--snapshotter", sn, s.ref)
				s.timed(t, op, sn, args...)
				s.requireUnpacked(t, sn)
				s.runView(t, sn, s.ref, "pulled-"+name, "")
				s.removeImages(t)
			})
		}
	}
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

func runVersion(t *testing.T, binDir string) {
	s := newSuite(t, binDir, harness.ContainerdOptions{})
	if !t.Run("import", s.testImport) {
		t.FailNow()
	}
	t.Run("run", s.testRun)
	t.Run("write", s.testWrite)
	t.Run("snapshot-view", s.testSnapshotView)
	t.Run("snapshots-cli", s.testSnapshotsCLI)
	t.Run("push", s.testPush)
	t.Run("restart", s.testRestart)
	t.Run("gc", s.testGC)
	t.Run("pull", s.testPull)
	if s.c.Major >= 2 {
		t.Run("import-local", s.testImportLocal)
	}
	if s.oc != nil {
		if err := s.oc.Stop(); err != nil {
			t.Errorf("overclone on SIGTERM: %v", err)
		}
	}
}

func TestContainerd16(t *testing.T) {
	runVersion(t, harness.Containerd16Bin)
}

func TestContainerd2(t *testing.T) {
	runVersion(t, harness.Containerd2BinDir())
}

// rebaseSafe records the decision TestContainerd2ParallelUnpack checks:
// whether overclone may advertise the "rebase" capability, i.e. whether
// whiteouts and opaque dirs survive containerd 2.x's parallel unpack. See
// deploy/README.md.
const rebaseSafe = false

// TestContainerd2ParallelUnpack pulls with max_concurrent_unpacks > 1 and
// "rebase" advertised for overclone: containerd then prepares every layer
// without its parent, applies it, and names the parent only at Commit. The
// built-in overlayfs is the control (containerd rewrites its bind mounts to
// overlays so the applier still writes whiteouts); for overclone the test
// asserts the decision recorded in rebaseSafe.
func TestContainerd2ParallelUnpack(t *testing.T) {
	s := newSuite(t, harness.Containerd2BinDir(), harness.ContainerdOptions{
		Capabilities:         []string{"rebase"},
		MaxConcurrentUnpacks: 4,
		LogLevel:             "debug",
	})
	// Parallel unpack is a pull-only path: push the image from this
	// containerd, then forget it so the pulls fetch and unpack.
	s.ctr(t, "images", "import", "--no-unpack", s.f.archive)
	ref := fmt.Sprintf("%s/overclone/e2e-parallel:1", s.f.registry.Host)
	s.ctr(t, "images", "tag", imageName, ref)
	s.ctr(t, "images", "push", "--plain-http", ref)
	s.removeImages(t)

	top := s.chainIDs()[len(s.chainIDs())-1]
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			s.timed(t, "pull, 4 parallel unpacks", sn, "images", "pull", "--plain-http", "--snapshotter", sn, ref)
			s.requireUnpacked(t, sn)
			if !s.unpackedInParallel(t, top) {
				t.Fatalf("containerd did not unpack %s in parallel; the test proves nothing", sn)
			}
			out := s.ctr(t, "run", "--rm", "--snapshotter", sn, ref, "parallel-"+sn)
			intact := out == s.f.img.Expected
			t.Logf("%s: whiteouts and opaque dirs survive a parallel unpack: %v", sn, intact)
			switch {
			case sn == "overlayfs" || rebaseSafe:
				compareView(t, "after a parallel unpack", out, s.f.img.Expected)
			case intact:
				t.Errorf("overclone kept whiteouts through a parallel unpack: rebase may be advertised; update rebaseSafe and deploy/")
			default:
				// Expected: the lost whiteouts are what deploy/
				// documents as the reason not to advertise rebase.
				var msg strings.Builder
				compareView(&recorder{TB: t, w: &msg}, "after a parallel unpack", out, s.f.img.Expected)
				t.Logf("overclone with rebase advertised (documented as unsupported):\n%s", msg.String())
			}
			s.removeImages(t)
		})
	}
}

// unpackedInParallel reads containerd's debug log for the unpack of the
// chain ending in top.
func (s *suite) unpackedInParallel(t *testing.T, top string) bool {
	t.Helper()
	b, err := os.ReadFile(s.c.Log)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, `msg="image unpacked"`) && strings.Contains(line, top) {
			return strings.Contains(line, "parallel=true")
		}
	}
	return false
}

// recorder turns compareView's failure into text.
type recorder struct {
	testing.TB
	w *strings.Builder
}

func (r *recorder) Errorf(format string, args ...any) { fmt.Fprintf(r.w, format, args...) }
func (r *recorder) Helper()                           {}
