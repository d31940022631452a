// Package e2e runs overclone as users do: the built daemon behind a private
// containerd (1.6 from Debian and a 2.x build), images imported from an
// archive and pulled from a local registry, containers run with runc, every
// check side by side with containerd's built-in overlayfs snapshotter, whose
// timings it records next to overclone's. Root only; nothing is mocked.
package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
	"golang.org/x/sys/unix"
)

// suite is one containerd (with its overclone daemons) under test. Every
// check runs for the built-in overlayfs snapshotter too: it is the reference
// the expected view is checked against, and the timing baseline.
type suite struct {
	f       *fixture
	dir     string
	c       *harness.Containerd
	proxies []harness.Proxy    // the overclone daemons, none until the daemon is in the tree
	oc      *harness.Overclone // proxies[0], the daemon in its default (auto) mode
	sns     []string           // snapshotters under test, overlayfs first
	label   string             // containerd version, for timings
	ref     string             // the image in the local registry, once pushed
}

// daemonConfigs are the overclone daemons a suite starts, by snapshotter
// name: the default configuration (mode auto, overlay on this kernel) and
// userspace mode. The userspace daemon's root shares the test dir's
// filesystem, or sits on a fresh loop filesystem of the kind named by
// OVERCLONE_E2E_USERSPACE_FS (xfs, btrfs: reflink copies; ext4), to time
// userspace mode where it clones instead of copying.
var daemonConfigs = []struct{ name, config string }{
	{harness.SnapshotterName, ""},
	{harness.UserspaceName, "mode = 'userspace'\n"},
}

// ctrTimeout bounds one ctr command; the slowest is a 64 MiB unpack.
const ctrTimeout = 2 * time.Minute

// newSuite starts the overclone daemons (only the default one when
// opts.Snippet is set: the deploy snippets name one) and a containerd.
func newSuite(t *testing.T, binDir string, opts harness.ContainerdOptions) *suite {
	t.Helper()
	f := getFixture(t)
	if m := harness.Missing(binDir, harness.ContainerdTools...); m != "" {
		require.Skipf(t, "containerd missing: %s (make containerd2 builds 2.x)", m)
	}
	dir, err := harness.TempDir("oc-")
	if err != nil {
		t.Fatal(err)
	}
	s := &suite{f: f, dir: dir, sns: []string{"overlayfs"}}
	// A loop filesystem for the userspace daemon is made before close is
	// registered, so that it is unmounted after the daemon stops.
	userspaceRoot := ""
	if kind := os.Getenv("OVERCLONE_E2E_USERSPACE_FS"); kind != "" && opts.Snippet == "" {
		userspaceRoot = filepath.Join(loopfs.MountSize(t, loopfs.Kind(kind), 4<<30), "root")
	}
	t.Cleanup(func() { s.close(t) })

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i, d := range daemonConfigs {
		if opts.Snippet != "" && i > 0 {
			break
		}
		ocDir := filepath.Join(dir, fmt.Sprintf("oc%d", i))
		if err := os.Mkdir(ocDir, 0o700); err != nil {
			t.Fatal(err)
		}
		oc, err := harness.NewOverclone(f.overcloneBin, ocDir, d.config, t.Logf)
		if err != nil {
			t.Fatal(err)
		}
		if d.name == harness.UserspaceName && userspaceRoot != "" {
			oc.Root = userspaceRoot
		}
		// Registered before Start, so that close stops it whatever
		// happens next.
		s.proxies = append(s.proxies, harness.Proxy{Name: d.name, Overclone: oc})
		if err := oc.Start(ctx); err != nil {
			t.Fatal(err)
		}
		s.sns = append(s.sns, d.name)
	}
	s.oc = s.proxies[0].Overclone
	opts.Proxies = s.proxies
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
	for _, p := range s.proxies {
		if t.Failed() {
			t.Logf("%s log:\n%s", p.Name, p.Overclone.Tail(40))
		}
		if err := p.Overclone.Stop(); err != nil {
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

// runView runs a container that writes the image's view and checks it.
func (s *suite) runView(t *testing.T, sn, ref, id string, op string) {
	t.Helper()
	got := s.runViewer(t, sn, ref, id, op, "view")
	compareView(t, fmt.Sprintf("ctr run --snapshotter %s %s", sn, ref), got, s.f.img.Expected)
}

// viewFile is the name the viewer writes its view to in a container's out
// dir.
const viewFile = "view.txt"

// runViewer runs the viewer's cmd (view or write) in a new container with
// `ctr run --rm` and returns the view it wrote to its out dir; op, when set,
// names the timing the run records. The bind mount and the file cost both
// snapshotters the same, well under a millisecond (one mount, a file of a
// few KiB renamed in the page cache, where stdout took a fifo and two
// copies), next to a container start of a hundred milliseconds or more: the
// timing still measures the same run.
func (s *suite) runViewer(t *testing.T, sn, ref, id, op, cmd string) string {
	t.Helper()
	o := s.viewerOut(t, id)
	args := append([]string{"run", "--rm"}, o.MountFlags()...)
	args = append(append(args, "--snapshotter", sn, ref, id), o.Command(cmd, viewFile)...)
	var out string
	if op != "" {
		out = s.timed(t, op, sn, args...)
	} else {
		out = s.ctr(t, args...)
	}
	return s.readView(t, o, viewFile, out)
}

// fillPastLimit runs, with `ctr run --rm` and the run flags given, a
// container id that writes size bytes, which must fail with an error
// that contains want. The viewer writes its error to its out dir, read
// from the host once ctr returned: ctr may lose what a process prints
// right before it exits (see harness.ViewerOut), and did, one run in
// several, for a container that hit its size limit.
func (s *suite) fillPastLimit(ctx context.Context, t *testing.T, id string, flags []string, size int64, want string) {
	t.Helper()
	o := s.viewerOut(t, id)
	const errFile = "fill-error.txt"
	args := append(append([]string{"run", "--rm"}, o.MountFlags()...), flags...)
	args = append(append(args, imageName, id), o.FillCommand("/past-the-limit", size, errFile)...)
	out, err := s.c.Ctr(ctx, args...)
	if err == nil {
		t.Fatalf("writing %d bytes in container %s succeeded; want %s", size, id, want)
	}
	got, rerr := os.ReadFile(filepath.Join(o.Dir, errFile))
	if rerr != nil || !strings.Contains(string(got), want) {
		t.Fatalf("writing %d bytes in container %s: %v, ctr printed %q, the viewer wrote %q (%v); want %s\n%s", size, id, err, out, got, rerr, want, s.oc.Tail(20))
	}
}

// viewerOut makes the out dir for container id.
func (s *suite) viewerOut(t *testing.T, id string) harness.ViewerOut {
	t.Helper()
	o, err := harness.NewViewerOut(s.dir, id)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// readView reads the view the viewer wrote to name; ctrOut is what ctr
// printed, shown when there is none.
func (s *suite) readView(t *testing.T, o harness.ViewerOut, name, ctrOut string) string {
	t.Helper()
	got, err := o.Read(name, ctrOut)
	if err != nil {
		t.Fatal(err)
	}
	return got
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
		// Snapshots of an aborted pull go with its lease, in a
		// collection containerd schedules on its own: give it time.
		rows := s.snapshots(t, sn)
		for i := 0; len(rows) > 0 && i < 50; i++ {
			time.Sleep(200 * time.Millisecond)
			rows = s.snapshots(t, sn)
		}
		if len(rows) > 0 {
			t.Errorf("%s: snapshots left after images rm --sync: %v", sn, rows)
		}
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
	for _, p := range s.proxies {
		if err := p.Overclone.Stop(); err != nil {
			t.Errorf("%s on SIGTERM: %v", p.Name, err)
		}
	}
}

func TestContainerd16(t *testing.T) {
	runVersion(t, harness.Containerd16Bin)
}

func TestContainerd2(t *testing.T) {
	runVersion(t, harness.Containerd2BinDir())
}
