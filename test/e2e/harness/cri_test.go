package harness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

// TestCRIOnSnippets checks that the CRI settings merge into the shipped
// deploy snippets as TOML (no table defined twice) and into the generated
// configs, and that the snippets' own CRI lines survive the merge.
func TestCRIOnSnippets(t *testing.T) {
	oc := &Overclone{Socket: "/tmp/x/oc.sock", Root: "/tmp/x/ocroot"}
	cri := CRI{SandboxImage: "overclone.test/pause:1", HostsDir: "/tmp/x/hosts"}
	cfg := containerdConfig{Root: "/r", State: "/s", Address: "/a.sock", Proxies: []Proxy{{Name: SnapshotterName, Overclone: oc}}}
	for _, tc := range []struct {
		major   int
		snippet string
		want    map[string]any // dotted plugin table path -> key -> value
	}{
		{1, "config-v2.toml", map[string]any{
			"io.containerd.grpc.v1.cri/sandbox_image":          cri.SandboxImage,
			"io.containerd.grpc.v1.cri/restrict_oom_score_adj": true,
			"io.containerd.grpc.v1.cri/registry/config_path":   cri.HostsDir,
			"io.containerd.grpc.v1.cri/containerd/snapshotter": SnapshotterName,
			"io.containerd.grpc.v1.cri/stats_collect_period":   int64(criStatsPeriod),
		}},
		{2, "config-v3.toml", map[string]any{
			"io.containerd.cri.v1.images/pinned_images/sandbox":   cri.SandboxImage,
			"io.containerd.cri.v1.images/snapshotter":             SnapshotterName,
			"io.containerd.cri.v1.images/registry/config_path":    cri.HostsDir,
			"io.containerd.cri.v1.images/stats_collect_period":    int64(criStatsPeriod),
			"io.containerd.cri.v1.runtime/restrict_oom_score_adj": true,
		}},
	} {
		snippet, err := os.ReadFile(filepath.Join("..", "..", "..", "deploy", "containerd", tc.snippet))
		if err != nil {
			t.Fatal(err)
		}
		text, err := cfg.fromSnippet(string(snippet))
		if err != nil {
			t.Fatal(err)
		}
		generated := cfg
		generated.CRI = true
		gen, err := generated.render(tc.major)
		if err != nil {
			t.Fatal(err)
		}
		for name, text := range map[string]string{tc.snippet: text, "generated": gen} {
			text = mergeTables(text, cri.tables(tc.major))
			var doc struct {
				Plugins map[string]map[string]any
			}
			if err := toml.Unmarshal([]byte(text), &doc); err != nil {
				t.Fatalf("%s with CRI: %v\n%s", name, err, text)
			}
			for path, want := range tc.want {
				if name == "generated" && filepath.Base(path) == "snapshotter" {
					continue // the built-in's CRI keeps its default
				}
				if got := lookup(doc.Plugins, path); got != want {
					t.Errorf("%s: %s = %v, want %v\n%s", name, path, got, want, text)
				}
			}
		}
	}
}

// lookup follows a slash-separated path of table names and a key.
func lookup(plugins map[string]map[string]any, path string) any {
	dirs := strings.Split(path, "/")
	var cur any = plugins[dirs[0]]
	for _, d := range dirs[1:] {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[d]
	}
	return cur
}
