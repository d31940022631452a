package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/overclone/overclone/test/e2e/harness"
)

// TestDeploySnippets runs containerd on the deploy/containerd snippets as
// they ship (only paths swapped for private ones, CRI enabled): the proxy
// plugin loads, CRI starts, and an import with --snapshotter overclone
// unpacks and runs, on 2.x through the transfer service the snippet
// configures.
func TestDeploySnippets(t *testing.T) {
	for _, tc := range []struct {
		name, binDir, snippet string
	}{
		{"containerd-1.6", harness.Containerd16Bin, "config-v2.toml"},
		{"containerd-2", harness.Containerd2BinDir(), "config-v3.toml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snippet, err := os.ReadFile(filepath.Join(repoRoot(), "deploy", "containerd", tc.snippet))
			if err != nil {
				t.Fatal(err)
			}
			s := newSuite(t, tc.binDir, harness.ContainerdOptions{Snippet: string(snippet)})
			plugins := s.ctr(t, "plugins", "ls")
			for _, want := range [][2]string{
				{"io.containerd.snapshotter.v1", "overclone"},
				{"io.containerd.grpc.v1", "cri"},
			} {
				if !pluginOK(plugins, want[0], want[1]) {
					t.Errorf("plugin %s %s not ok:\n%s", want[0], want[1], plugins)
				}
			}
			// CRI says at start which snapshotter it uses and where
			// the image filesystem is (exports.root; 1.6 ignores
			// exports and reports a dir under its own root).
			b, err := os.ReadFile(s.c.Log)
			if err != nil {
				t.Fatal(err)
			}
			want := []string{`Start cri plugin with config {PluginConfig:{ContainerdConfig:{Snapshotter:overclone `}
			if s.c.Major >= 2 {
				want = []string{
					`Get image filesystem path \"` + s.oc.Root + `\" for snapshotter \"overclone\"`,
					`Registered runtime \"runc\" with snapshotter \"overclone\"`,
				}
			}
			for _, w := range want {
				if !strings.Contains(string(b), w) {
					t.Errorf("containerd log lacks %s", w)
				}
			}
			s.ctr(t, "images", "import", "--snapshotter", harness.SnapshotterName, s.f.archive)
			s.requireUnpacked(t, harness.SnapshotterName)
			s.runView(t, harness.SnapshotterName, imageName, "deploy", "")
			s.removeImages(t)
		})
	}
}

func pluginOK(ls, typ, id string) bool {
	for _, line := range strings.Split(ls, "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[0] == typ && f[1] == id {
			return f[len(f)-1] == "ok"
		}
	}
	return false
}

// TestWaitScript checks hack/wait-overclone.sh, the gate a node setup runs
// before restarting containerd: it fails while nothing answers and returns
// once the daemon, started after it, serves.
func TestWaitScript(t *testing.T) {
	f := getFixture(t)
	dir, err := harness.TempDir("oc-wait-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	oc, err := harness.NewOverclone(f.overcloneBin, dir, "", t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(repoRoot(), "hack", "wait-overclone.sh")
	env := append(os.Environ(), "OVERCLONE="+f.cliBin)

	cmd := exec.Command(script, oc.Socket, "1")
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Fatalf("wait-overclone.sh succeeded with no daemon: %s", out)
	}

	cmd = exec.Command(script, oc.Socket, "60")
	cmd.Env = env
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := oc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer oc.Stop()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("wait-overclone.sh after the daemon started: %v: %s", err, out.String())
	}
	t.Log(strings.TrimSpace(out.String()))
}

// TestReadmeCRISnippets checks that README's "Kubernetes node" section
// shows the shipped deploy/containerd snippets (the files TestCRI runs
// containerd on) line for line, less their comments, and gives crictl the
// templates TestCRI runs.
func TestReadmeCRISnippets(t *testing.T) {
	section := checkReadmeSnippets(t, "### containerd configuration for CRI", "config-v2.toml", "config-v3.toml")
	for _, tmpl := range []string{imageFSTemplate, podStateTemplate} {
		if !strings.Contains(section, "'"+tmpl+"'") {
			t.Errorf("README's checks do not use the template TestCRI runs: %s", tmpl)
		}
	}
}

// checkReadmeSnippets checks that README's section under heading shows the
// files names of deploy/containerd as its toml blocks, in order, line for
// line less their comments, and returns the section.
func checkReadmeSnippets(t *testing.T, heading string, names ...string) string {
	t.Helper()
	readme, err := os.ReadFile(filepath.Join(repoRoot(), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(readme)
	start := strings.Index(text, heading)
	if start < 0 {
		t.Fatalf("README has no %q", heading)
	}
	section := text[start:]
	if end := strings.Index(section[1:], "\n## "); end >= 0 {
		section = section[:end+1]
	}
	var blocks []string
	for rest := section; ; {
		i := strings.Index(rest, "```toml\n")
		if i < 0 {
			break
		}
		rest = rest[i+len("```toml\n"):]
		j := strings.Index(rest, "```")
		blocks = append(blocks, strings.TrimSpace(rest[:j]))
		rest = rest[j:]
	}
	for i, name := range names {
		b, err := os.ReadFile(filepath.Join(repoRoot(), "deploy", "containerd", name))
		if err != nil {
			t.Fatal(err)
		}
		var lines []string
		for _, l := range strings.Split(string(b), "\n") {
			if c := strings.Index(l, "#"); c >= 0 {
				l = l[:c]
			}
			if l = strings.TrimRight(l, " \t"); l != "" {
				lines = append(lines, l)
			}
		}
		if i >= len(blocks) {
			t.Fatalf("README's section %q has %d toml blocks, want one per snippet", heading, len(blocks))
		}
		if want := strings.Join(lines, "\n"); blocks[i] != want {
			t.Errorf("README's block %d under %q differs from deploy/containerd/%s less comments:\n%s\nwant:\n%s", i+1, heading, name, blocks[i], want)
		}
	}
	return section
}
