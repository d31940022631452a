package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/overclone/overclone/test/daemon"
)

// TestFlattenCommand: on a daemon whose mounts take at most two layers,
// `overclone flatten` of a four-layer image names the flattened layer a
// container on the image then stands on, and that layer holds the
// image's merged view.
func TestFlattenCommand(t *testing.T) {
	d := daemon.Start(t, filepath.Join(t.TempDir(), "root"), "max_stack = 2\n")
	ctx := namespaces.WithNamespace(context.Background(), defaultNamespace)
	sn := d.Client()
	writeLayer(ctx, t, sn, "img-1", "", map[string]string{"etc/motd": "hello\n", "gone": "x"})
	writeLayer(ctx, t, sn, "img-2", "img-1", map[string]string{"a": "2\n"}, "gone")
	writeLayer(ctx, t, sn, "img-3", "img-2", map[string]string{"b": "3\n"})
	writeLayer(ctx, t, sn, "img-4", "img-3", map[string]string{"c": "4\n"})

	var out, errb bytes.Buffer
	if code := dispatch(context.Background(), []string{"flatten", "--address", d.Address, "img-4"}, &out, &errb); code != exitOK {
		t.Fatalf("flatten: %d %s%s", code, out.String(), errb.String())
	}
	_, rest, ok := strings.Cut(out.String(), "uses the flattened layer ")
	if !ok {
		t.Fatalf("flatten named no flattened layer: %s", out.String())
	}
	flat := strings.Fields(rest)[0]
	wantFile(t, filepath.Join(flat, "etc/motd"), "hello\n")

	ctr, err := sn.Prepare(ctx, "ctr", "img-4")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(ctr[0].Options, ","), flat) {
		t.Fatalf("a container on img-4 mounts %v, not the flattened layer %s", ctr[0].Options, flat)
	}
	withMount(t, ctr, func(dir string) {
		for name, want := range map[string]string{"etc/motd": "hello\n", "a": "2\n", "b": "3\n", "c": "4\n"} {
			wantFile(t, filepath.Join(dir, name), want)
		}
	})
}
