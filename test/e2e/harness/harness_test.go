package harness

import (
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// TestRender checks that the generated containerd configs are TOML and
// say what the e2e tests rely on; it needs neither root nor containerd.
func TestRender(t *testing.T) {
	oc := &Overclone{Socket: `/tmp/x/oc "0".sock`, Root: "/tmp/x/root"}
	cfg := containerdConfig{
		Root: "/tmp/x/root", State: "/tmp/x/state", Address: "/tmp/x/c.sock",
		Proxies:      []Proxy{{Name: SnapshotterName, Overclone: oc}, {Name: UserspaceName, Overclone: oc}},
		Capabilities: []string{"rebase"},
	}
	for _, major := range []int{1, 2} {
		text, err := cfg.render(major)
		if err != nil {
			t.Fatal(err)
		}
		var doc map[string]any
		if err := toml.Unmarshal([]byte(text), &doc); err != nil {
			t.Fatalf("containerd %d.x config is not TOML: %v\n%s", major, err, text)
		}
		proxies, _ := doc["proxy_plugins"].(map[string]any)
		for _, name := range []string{SnapshotterName, UserspaceName} {
			p, _ := proxies[name].(map[string]any)
			if p["address"] != oc.Socket || p["type"] != "snapshot" {
				t.Errorf("containerd %d.x: proxy %s: %v", major, name, p)
			}
		}
		if major == 2 {
			for _, want := range []string{`snapshotter = "overclone-userspace"`, `capabilities = ["rebase"]`, `max_concurrent_unpacks = 1`} {
				if !strings.Contains(text, want) {
					t.Errorf("config v3 lacks %s:\n%s", want, text)
				}
			}
		}
	}
	if _, err := cfg.render(3); err == nil {
		t.Error("containerd 3.x: no error")
	}
}

func TestFromSnippet(t *testing.T) {
	oc := &Overclone{Socket: "/tmp/x/oc.sock", Root: "/tmp/x/ocroot"}
	cfg := containerdConfig{Root: "/r", State: "/s", Address: "/a.sock", Proxies: []Proxy{{Name: SnapshotterName, Overclone: oc}}}
	text, err := cfg.fromSnippet("# c\nversion = 3\n[proxy_plugins.overclone]\n  address = \"" + DefaultSocket + "\"\n  exports = { root = \"" + DefaultRoot + "\" }\n")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Version      int
		Root         string
		ProxyPlugins map[string]struct {
			Address string
			Exports map[string]string
		} `toml:"proxy_plugins"`
	}
	if err := toml.Unmarshal([]byte(text), &doc); err != nil {
		t.Fatalf("%v\n%s", err, text)
	}
	p := doc.ProxyPlugins[SnapshotterName]
	if doc.Version != 3 || doc.Root != "/r" || p.Address != oc.Socket || p.Exports["root"] != oc.Root {
		t.Errorf("%+v\n%s", doc, text)
	}
}

// TestFromSnippetNode checks the node's config before the switch: the
// snippet's version line alone, no proxy; and that a snippet naming
// overclone needs its daemon.
func TestFromSnippetNode(t *testing.T) {
	cfg := containerdConfig{Root: "/r", State: "/s", Address: "/a.sock"}
	text, err := cfg.fromSnippet("version = 2\n")
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := toml.Unmarshal([]byte(text), &doc); err != nil {
		t.Fatalf("%v\n%s", err, text)
	}
	if doc["version"] != int64(2) || doc["root"] != "/r" || doc["proxy_plugins"] != nil {
		t.Errorf("%v\n%s", doc, text)
	}
	if _, err := cfg.fromSnippet("version = 3\n[proxy_plugins.overclone]\n  address = \"" + DefaultSocket + "\"\n"); err == nil {
		t.Error("a snippet naming overclone without a daemon: no error")
	}
}

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{`/a\040b`: "/a b", `/plain`: "/plain", `/x\`: `/x\`, `/t\011\134`: "/t\t\\"} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestTimingsTable(t *testing.T) {
	var tm Timings
	if !tm.Empty() {
		t.Fatal("new Timings not empty")
	}
	tm.Add("2.4.2", "run", "overlayfs", 100*time.Millisecond)
	tm.Add("2.4.2", "run", SnapshotterName, 50*time.Millisecond)
	tm.Add("2.4.2", "run", SnapshotterName, 150*time.Millisecond)
	tm.Add("2.4.2", "run", SnapshotterName, 200*time.Millisecond)
	table := tm.Table()
	for _, want := range []string{"overlayfs", "100ms (1)", "150ms (3)", "1.50"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
}
