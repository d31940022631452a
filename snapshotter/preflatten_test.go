package snapshotter

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestPreflatten: with max_stack 8 (cuts every 4 layers), the Commit of
// layer 12 builds flat(12) in the background, and the first container on
// the 16-layer stack, which stands on flat(12), builds nothing: the build
// a 1000-layer image's first run used to pay. Layer 8's Commit builds
// nothing ahead (a stack of 8 to 11 layers may well stop there).
func TestPreflatten(t *testing.T) {
	ctx, s := openTest(t, t.TempDir(), WithMaxStack(8))
	parent := ""
	for i := 1; i <= 16; i++ {
		key := fmt.Sprintf("layer-%d", i)
		m, err := s.Prepare(ctx, key+"-active", parent)
		if err != nil {
			t.Fatal(err)
		}
		target := t.TempDir()
		if err := m[0].Mount(target); err != nil {
			t.Fatal(err)
		}
		err = os.WriteFile(filepath.Join(target, fmt.Sprintf("f%d", i)), []byte(key), 0o644)
		unmount(target)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(ctx, key, key+"-active"); err != nil {
			t.Fatal(err)
		}
		s.background.Wait()
		chain, err := s.chain(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		id := chain[0]
		if i == 8 || i == 12 {
			_, err := os.Stat(s.flatPath(id))
			if built := err == nil; built != (i == 12) {
				t.Fatalf("after the commit of layer %d, flat/%s there: %v, want %v", i, id, built, i == 12)
			}
		}
		parent = key
	}
	before := s.FlattenBuilds()
	m, err := s.Prepare(ctx, "container", parent)
	if err != nil {
		t.Fatal(err)
	}
	if after := s.FlattenBuilds(); after != before {
		t.Fatalf("the first container on 16 layers built %d flattened layers, want none", after-before)
	}
	target := t.TempDir()
	if err := m[0].Mount(target); err != nil {
		t.Fatal(err)
	}
	defer unmount(target)
	for i := 1; i <= 16; i++ {
		if b, err := os.ReadFile(filepath.Join(target, fmt.Sprintf("f%d", i))); err != nil || string(b) != fmt.Sprintf("layer-%d", i) {
			t.Fatalf("f%d in the container: %q, %v", i, b, err)
		}
	}
}
