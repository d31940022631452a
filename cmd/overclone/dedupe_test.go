package main

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/overclone/overclone/test/daemon"
	"github.com/overclone/overclone/test/loopfs"
)

// TestDedupeCommand: layers committed while dedupe was off are deduped by
// `overclone dedupe` through the daemon: --dry-run reports the file two
// images share and shares nothing (usage shows no shared bytes), the pass
// prints a line per layer and the bytes shared, and `overclone usage`
// then shows both layers' copies as shared, the later layer's size no
// longer counting it.
func TestDedupeCommand(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	d := daemon.Start(t, root, "dedupe = \"off\"\n")
	ctx := namespaces.WithNamespace(context.Background(), defaultNamespace)
	sn := d.Client()

	r := rand.New(rand.NewPCG(7, 8))
	lib := make([]byte, 4<<20)
	for i := range lib {
		lib[i] = byte(r.Uint32())
	}
	writeLayer(ctx, t, sn, "img-a", "", map[string]string{"usr/lib/libbig.so": string(lib), "etc/a": "a\n"})
	writeLayer(ctx, t, sn, "img-b", "", map[string]string{"opt/libbig.so": string(lib), "etc/b": "b\n"})

	run := func(args ...string) string {
		t.Helper()
		var out, errb bytes.Buffer
		code := dispatch(context.Background(), append([]string{args[0], "--address", d.Address}, args[1:]...), &out, &errb)
		if code != exitOK {
			t.Fatalf("overclone %v: exit %d: %s%s", args, code, out.String(), errb.String())
		}
		return out.String() + errb.String()
	}
	row := func(out, key string) []string {
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) > 0 && f[0] == key {
				return f
			}
		}
		t.Fatalf("no row for %s in:\n%s", key, out)
		return nil
	}

	out := run("dedupe", "--dry-run")
	if !strings.Contains(out, "[2/2] img-b") || !strings.Contains(out, "1 files would share with another layer: 4.0 MiB") {
		t.Errorf("dedupe --dry-run:\n%s", out)
	}
	before := run("usage")
	if f := row(before, "img-b"); f[4] != "0" && f[4] != "0 B" {
		t.Errorf("a dry run shared extents: %v", f)
	}

	out = run("dedupe")
	if !regexp.MustCompile(`\[1/2\] img-a: 2 files indexed`).MatchString(out) || !strings.Contains(out, "1 files shared with another layer: 4.0 MiB") {
		t.Errorf("dedupe:\n%s", out)
	}
	after := run("usage")
	t.Logf("usage before:\n%s\nafter:\n%s", before, after)
	// KEY KIND SIZE(2 fields) SHARED(2) EXCLUSIVE(2) INODES PARENT
	for _, key := range []string{"img-a", "img-b"} {
		if f := row(after, key); f[5] != "MiB" || !strings.HasPrefix(f[4], "4.") {
			t.Errorf("%s shares %s %s, want 4 MiB", key, f[4], f[5])
		}
	}
	if a, b := row(after, "img-a"), row(after, "img-b"); b[3] == "MiB" || a[3] != "MiB" {
		t.Errorf("sizes after dedupe: img-a %s %s, img-b %s %s: want only img-a to count the shared file", a[2], a[3], b[2], b[3])
	}
	if out := run("dedupe"); !strings.Contains(out, "0 layers") {
		t.Errorf("second pass:\n%s", out)
	}
}
