package e2e

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/image/view"
)

// compareView fails with the lines that differ and, for the paths that
// stand for one snapshotter rule each, names the rule broken.
func compareView(t testing.TB, what, got, want string) {
	t.Helper()
	if got == want {
		return
	}
	rules := []struct{ path, broken string }{
		{image.WhiteoutFile, "whiteout (.wh.) not honoured"},
		{image.WhiteoutDir, "a dir recreated over a whiteout is not opaque"},
		{image.OpaqueLower, "opaque dir (.wh..wh..opq) not honoured"},
		{image.CapFile, "security.capability lost or changed"},
	}
	gotLines, wantLines := lineSet(got), lineSet(want)
	var msg strings.Builder
	var differing []string
	for _, l := range strings.Split(want, "\n") {
		if l != "" && !gotLines[l] {
			fmt.Fprintf(&msg, "  missing: %s\n", l)
			differing = append(differing, l)
		}
	}
	for _, l := range strings.Split(got, "\n") {
		if l != "" && !wantLines[l] {
			fmt.Fprintf(&msg, "  extra:   %s\n", l)
			differing = append(differing, l)
		}
	}
	for _, r := range rules {
		rel := strings.TrimPrefix(r.path, image.DataDir+"/")
		for _, l := range differing {
			if strings.HasPrefix(l, rel+" ") {
				fmt.Fprintf(&msg, "  => %s: %s\n", rel, r.broken)
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
	// The view sorts by path, the first field; the test image's paths
	// have no spaces.
	sorted := append([]string(nil), lines...)
	sort.SliceStable(sorted, func(i, j int) bool {
		return strings.Fields(sorted[i])[0] < strings.Fields(sorted[j])[0]
	})
	return strings.Join(sorted, "\n") + "\n"
}
