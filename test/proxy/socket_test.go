package proxy

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/daemon"
)

// TestSocket checks what the daemon does with its socket: permissions, a
// stale socket replaced, a live one not stolen, a non-socket left alone,
// and a root that another daemon holds refused with a message.
func TestSocket(t *testing.T) {
	// A root the daemon creates is 0700; one that exists is left as it is.
	d := daemon.Start(t, filepath.Join(t.TempDir(), "root"), "")

	t.Run("permissions", func(t *testing.T) {
		fi, err := os.Stat(d.Address)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o660 {
			t.Errorf("socket mode %o, want 660", fi.Mode().Perm())
		}
		di, err := os.Stat(filepath.Dir(d.Address))
		if err != nil {
			t.Fatal(err)
		}
		if di.Mode().Perm() != 0o700 {
			t.Errorf("socket directory mode %o, want 700", di.Mode().Perm())
		}
		ri, err := os.Stat(d.Root)
		if err != nil {
			t.Fatal(err)
		}
		if ri.Mode().Perm() != 0o700 {
			t.Errorf("root mode %o, want 700", ri.Mode().Perm())
		}
	})

	t.Run("live socket is not stolen", func(t *testing.T) {
		out, err := exec.Command(daemon.Binary(t), "--root", t.TempDir(), "--address", d.Address, "--config", d.Config).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "another daemon is serving") {
			t.Fatalf("second daemon on a live socket: %v: %s", err, out)
		}
		if c, err := net.Dial("unix", d.Address); err != nil {
			t.Fatalf("first daemon's socket gone: %v", err)
		} else {
			c.Close()
		}
	})

	t.Run("root held by another daemon", func(t *testing.T) {
		other := filepath.Join(t.TempDir(), "other.sock")
		out, err := exec.Command(daemon.Binary(t), "--root", d.Root, "--address", other, "--config", d.Config).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "another overclone using this root") {
			t.Fatalf("second daemon on a held root: %v: %s", err, out)
		}
	})

	t.Run("stale socket is replaced", func(t *testing.T) {
		d.Kill()
		if _, err := os.Lstat(d.Address); err != nil {
			t.Fatalf("SIGKILL should leave the socket file behind: %v", err)
		}
		if err := d.Restart(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("an existing shared directory is not restricted", func(t *testing.T) {
		shared := t.TempDir()
		if err := os.Chmod(shared, 0o777|os.ModeSticky); err != nil {
			t.Fatal(err)
		}
		other := daemon.Start(t, t.TempDir(), "")
		other.Stop()
		other.Address = filepath.Join(shared, "overclone.sock")
		other.Args[3] = other.Address // --address
		if err := other.Restart(); err != nil {
			t.Fatal(err)
		}
		defer other.Stop()
		fi, err := os.Stat(shared)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode()&(os.ModePerm|os.ModeSticky) != 0o777|os.ModeSticky {
			t.Fatalf("the daemon changed %s to %v", shared, fi.Mode())
		}
	})

	t.Run("a file that is not a socket is left alone", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "not-a-socket")
		if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(daemon.Binary(t), "--root", t.TempDir(), "--address", path, "--config", d.Config).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "not a socket") {
			t.Fatalf("daemon on a regular file: %v: %s", err, out)
		}
		if b, _ := os.ReadFile(path); string(b) != "keep me" {
			t.Fatal("the file was touched")
		}
	})

	t.Run("a named config file that is missing", func(t *testing.T) {
		out, err := exec.Command(daemon.Binary(t), "--root", t.TempDir(), "--address", filepath.Join(t.TempDir(), "s"), "--config", "/nonexistent/overclone.toml").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "no such file") {
			t.Fatalf("missing named config: %v: %s", err, out)
		}
	})
}
