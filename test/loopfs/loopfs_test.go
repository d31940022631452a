package loopfs

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMountEachKind(t *testing.T) {
	for _, k := range All {
		t.Run(string(k), func(t *testing.T) {
			mnt := Mount(t, k)
			got, err := FSType(mnt)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(k) {
				t.Fatalf("mounted %s, statfs says %s", k, got)
			}
			if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		})
	}
}
