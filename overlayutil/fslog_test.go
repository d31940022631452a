package overlayutil

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/require"
)

// TestKernelSaysWithoutPrefix: the kernel's fs_context log hands each
// message back as "e overlay: ..." (level, then the source); a reason shown
// to an operator carries only the message, as dmesg would print it after
// "overlayfs:".
func TestKernelSaysWithoutPrefix(t *testing.T) {
	dir := t.TempDir()
	var lowers []string
	for i := range 501 {
		l := filepath.Join(dir, strconv.Itoa(i))
		if err := os.Mkdir(l, 0o755); err != nil {
			t.Fatal(err)
		}
		lowers = append(lowers, l)
	}
	msg := kernelSays("overlay", []string{"lowerdir=" + strings.Join(lowers, ":")})
	if msg == "" {
		require.Skip(t, "no fsopen log on this kernel")
	}
	if !strings.HasPrefix(msg, "too many lower directories") {
		t.Errorf("kernelSays = %q, want the message alone, starting %q", msg, "too many lower directories")
	}
}

func TestTrimFSLogPrefix(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"e overlay: too many lower directories, limit is 500\n", "too many lower directories, limit is 500"},
		{"w overlay: option \"index=on\" is useless", "option \"index=on\" is useless"},
		{"i overlay: something", "something"},
		// A message logged without a source keeps all its words.
		{"e Bad value for 'lowerdir'", "Bad value for 'lowerdir'"},
		// Another source's name is part of the message.
		{"e VFS: something else", "VFS: something else"},
		{"no prefix at all", "no prefix at all"},
	} {
		if got := trimFSLogPrefix(tc.in, "overlay"); got != tc.want {
			t.Errorf("trimFSLogPrefix(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
