package durability

import (
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

// upperOf is where an active snapshot's files are written.
func upperOf(t *testing.T, m []mount.Mount) string {
	t.Helper()
	if m[0].Type == "bind" {
		return m[0].Source
	}
	for _, o := range m[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v
		}
	}
	t.Fatalf("no upper in %v", m)
	return ""
}

// topOf is the layer a view was made of.
func topOf(t *testing.T, m []mount.Mount) string {
	t.Helper()
	if m[0].Type == "bind" {
		return m[0].Source
	}
	for _, o := range m[0].Options {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			top, _, _ := strings.Cut(v, ":")
			return top
		}
	}
	t.Fatalf("no lowerdir in %v", m)
	return ""
}
