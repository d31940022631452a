package ops

import (
	"os"
	"os/exec"
	"testing"

	"github.com/overclone/overclone/test/require"
)

func chattr(t *testing.T, flag, path string) {
	t.Helper()
	if out, err := exec.Command("chattr", flag, path).CombinedOutput(); err != nil {
		require.Skipf(t, "chattr %s %s: %v: %s", flag, path, err, out)
	}
}

func socketMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}
