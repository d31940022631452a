package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/content"
	contentproxy "github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/core/diff"
	diffproxy "github.com/containerd/containerd/v2/core/diff/proxy"
	snproxy "github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/dialer"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/rootfs"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/image/view"
	"github.com/overclone/overclone/test/require"
)

// differLine is what the daemon logs for each layer its differ wrote: the
// proof that a diff was overclone's and not the walking differ's.
const differLine = "overclone differ: wrote layer from the upper"

// TestDiffService turns a container's changes into a layer through
// overclone's differ and checks that the layer, applied on the image,
// gives the container's view. The container appends to, chmods and
// removes lower files, creates a dir and a file, and renames a lower
// directory (a redirect in its upper).
//
// containerd 2.x reaches the differ as a proxy diff plugin placed first in
// its diff service (deploy/containerd/diff-v3.toml, as it ships), through
// `ctr snapshots diff`; its imports with --local apply every layer through
// the same diff service, which shows that Apply falls through to the
// walking differ, and a diff overclone cannot serve (a layer without
// parent) goes to the walking differ too. containerd 1.6 has no proxy
// diff plugins: a client calls overclone's diff API itself, with the
// snapshots of containerd 1.6 and its content store.
func TestDiffService(t *testing.T) {
	t.Run("containerd-2", func(t *testing.T) { testDiff(t, harness.Containerd2BinDir(), true) })
	t.Run("containerd-1.6", func(t *testing.T) { testDiff(t, harness.Containerd16Bin, false) })
}

func testDiff(t *testing.T, binDir string, viaContainerd bool) {
	f := getFixture(t)
	if m := harness.Missing(binDir, harness.ContainerdTools...); m != "" {
		require.Skipf(t, "containerd missing: %s (make containerd2 builds 2.x)", m)
	}
	dir, err := harness.TempDir("oc-diff-")
	if err != nil {
		t.Fatal(err)
	}
	sn := harness.SnapshotterName
	s := &suite{f: f, dir: dir, sns: []string{sn}}
	t.Cleanup(func() { s.close(t) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	ctdDir, ocDir := filepath.Join(dir, "ctd"), filepath.Join(dir, "oc0")
	for _, d := range []string{ctdDir, ocDir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// The differ writes layers to the content store of this containerd.
	oc, err := harness.NewOverclone(f.overcloneBin, ocDir, fmt.Sprintf("containerd_address = %q\n", filepath.Join(ctdDir, "containerd.sock")), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	s.proxies = []harness.Proxy{{Name: sn, Overclone: oc}}
	if err := oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	s.oc = oc
	opts := harness.ContainerdOptions{BinDir: binDir, Proxies: s.proxies}
	if viaContainerd {
		snippet, err := os.ReadFile(filepath.Join(repoRoot(), "deploy/containerd/diff-v3.toml"))
		if err != nil {
			t.Fatal(err)
		}
		opts.Extra = string(snippet)
	}
	if s.c, err = harness.StartContainerd(ctx, ctdDir, opts, t.Logf); err != nil {
		t.Fatal(err)
	}
	s.label = s.c.Version

	imp := []string{"images", "import", "--snapshotter", sn}
	if viaContainerd {
		imp = append(imp, "--local")
	}
	s.ctr(t, append(imp, f.archive)...)
	if n := differLines(t, oc); n != 0 {
		t.Fatalf("overclone's differ wrote %d layers during an import: Apply is not its to serve", n)
	}

	id := "differ-" + strings.ReplaceAll(s.c.Version, ".", "-")
	want := s.changeContainer(t, id)

	var layer []byte
	start := time.Now()
	if viaContainerd {
		layer = []byte(s.ctr(t, "snapshots", "--snapshotter", sn, "diff", id))
	} else {
		layer = s.diffThroughOverclone(t, ctx, id)
	}
	t.Logf("diff of the container's snapshot: %d bytes in %s", len(layer), time.Since(start).Round(time.Millisecond))
	if n := differLines(t, oc); n != 1 {
		t.Fatalf("overclone's differ wrote %d layers, want 1: the diff was not its own", n)
	}
	// The rename is a redirect in the container's upper, which the
	// walking differ's EROFS cousin (DiffDirChanges) could not follow.
	upper := differUpper(t, oc)
	if r, err := getxattr(filepath.Join(upper, image.DataDir, "merged-renamed"), "trusted.overlay.redirect"); err != nil || r == "" {
		t.Errorf("the renamed dir in the upper %s has no redirect (%q, %v): the test no longer covers one", upper, r, err)
	}
	if want == s.f.img.Expected {
		t.Fatal("the container's view is the image's: it changed nothing")
	}
	if got := s.applyOnImage(t, layer); got != want {
		compareView(t, "the image with the container's layer applied", got, want)
	}

	if viaContainerd {
		// A layer without parent is not overclone's to diff: the
		// walking differ makes it.
		ids := s.chainIDs()
		s.ctr(t, "snapshots", "--snapshotter", sn, "diff", ids[0])
		if n := differLines(t, oc); n != 1 {
			t.Errorf("overclone's differ served a diff it should have passed on (%d layers)", n)
		}
	}
}

// changeContainer runs a container, changes its files and renames a lower
// directory, and returns the view it then has; its snapshot stays.
func (s *suite) changeContainer(t *testing.T, id string) string {
	t.Helper()
	o := s.viewerOut(t, id)
	args := append([]string{"run", "-d"}, o.MountFlags()...)
	s.ctr(t, append(args, "--snapshotter", harness.SnapshotterName, imageName, id, "/bin/viewer", "sleep")...)
	t.Cleanup(func() { s.removeContainer(t, id) })
	s.requireRunning(t, id)
	exec := func(execID string, args ...string) string {
		return s.ctr(t, append([]string{"tasks", "exec", "--exec-id", execID, id}, args...)...)
	}
	exec("write", o.Command("write", "write.txt")...)
	data := "/" + image.DataDir
	exec("rename", "/bin/viewer", "rename", data+"/merged", data+"/merged-renamed")
	out := exec("view", o.Command("view", "final.txt")...)
	got := s.readView(t, o, "final.txt", out)
	if !strings.Contains(got, "merged-renamed/") || strings.Contains(got, "\nmerged/") {
		t.Fatalf("the container's view after the rename lacks it:\n%s", got)
	}
	return got
}

// diffThroughOverclone is a containerd client that takes its diff service
// from overclone's socket: the snapshots are containerd's (which asks
// overclone for them), the differ overclone's, the layer lands in
// containerd's content store.
func (s *suite) diffThroughOverclone(t *testing.T, ctx context.Context, id string) []byte {
	t.Helper()
	dial := func(address string) *grpc.ClientConn {
		conn, err := grpc.NewClient(dialer.DialAddress(address),
			grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithContextDialer(dialer.ContextDialer))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	ctd, ocConn := dial(s.c.Address), dial(s.oc.Socket)
	ctx = namespaces.WithNamespace(ctx, harness.Namespace)
	sn := snproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(ctd), harness.SnapshotterName)
	differ := diffproxy.NewDiffApplier(diffapi.NewDiffClient(ocConn)).(diff.Comparer)
	desc, err := rootfs.CreateDiff(ctx, id, sn, differ)
	if err != nil {
		t.Fatal(err)
	}
	blob, err := content.ReadBlob(ctx, contentproxy.NewContentStore(ctd), desc)
	if err != nil {
		t.Fatal(err)
	}
	return blob
}

// applyOnImage prepares a snapshot on the image's top layer, applies layer
// on it with containerd's applier and returns the view it then has.
func (s *suite) applyOnImage(t *testing.T, layer []byte) string {
	t.Helper()
	ids := s.chainIDs()
	sn := harness.SnapshotterName
	out := s.ctr(t, "snapshots", "--snapshotter", sn, "prepare", "--mounts", "applied", ids[len(ids)-1])
	defer s.ctr(t, "snapshots", "--snapshotter", sn, "rm", "applied")
	ms, err := harness.ParseMounts(out)
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(s.dir, "applied")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := harness.MountAt(ms, target); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := unix.Unmount(target, 0); err != nil {
			t.Error(err)
		}
	}()
	rc, err := compression.DecompressStream(bytes.NewReader(layer))
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := archive.Apply(context.Background(), target, rc); err != nil {
		t.Fatal(err)
	}
	entries, err := view.Read(filepath.Join(target, image.DataDir))
	if err != nil {
		t.Fatal(err)
	}
	return view.Format(entries)
}

// differLines counts the layers overclone's differ wrote, from its log.
func differLines(t *testing.T, oc *harness.Overclone) int {
	t.Helper()
	b, err := os.ReadFile(oc.Log)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), differLine)
}

// differUpper is the upper dir named by the differ's last log line.
func differUpper(t *testing.T, oc *harness.Overclone) string {
	t.Helper()
	b, err := os.ReadFile(oc.Log)
	if err != nil {
		t.Fatal(err)
	}
	upper := ""
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, differLine) {
			continue
		}
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, "upper="); ok {
				upper = strings.Trim(v, `"`)
			}
		}
	}
	if upper == "" {
		t.Fatal("no differ log line names an upper")
	}
	return upper
}

func getxattr(path, name string) (string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Lgetxattr(path, name, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// TestReadmeDiffSnippets checks that README's differ section shows the
// shipped deploy/containerd/diff-*.toml line for line, less comments.
func TestReadmeDiffSnippets(t *testing.T) {
	checkReadmeSnippets(t, "## Layers from a container's changes", "diff-v3.toml", "diff-v2.toml")
}
