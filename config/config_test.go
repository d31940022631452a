package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name    string
		toml    string
		wantErr string
		check   func(t *testing.T, c Config)
	}{
		{name: "empty keeps defaults", toml: "", check: func(t *testing.T, c Config) {
			if c.Root != DefaultRoot || !c.SyncOnCommit || c.ShutdownTimeout != DefaultShutdownTimeout {
				t.Fatalf("defaults lost: %+v", c)
			}
		}},
		{name: "values", toml: "root = \"/x\"\nmount_options = [\"metacopy=on\"]\nvolatile = true\nsync_on_commit = false\nshutdown_timeout = \"3s\"\n", check: func(t *testing.T, c Config) {
			if c.Root != "/x" || len(c.MountOptions) != 1 || !c.Volatile || c.SyncOnCommit || time.Duration(c.ShutdownTimeout) != 3*time.Second {
				t.Fatalf("got %+v", c)
			}
		}},
		{name: "unknown key names key and line", toml: "root = \"/x\"\n\nrooot = \"/y\"\n", wantErr: `unknown key "rooot" (line 3)`},
		{name: "unknown nested key", toml: "[metrics]\naddress = \"x\"\n", wantErr: `unknown key "metrics`},
		{name: "bad type", toml: "volatile = \"yes\"\n", wantErr: "line 1"},
		{name: "bad duration", toml: "shutdown_timeout = \"soon\"\n", wantErr: "soon"},
		{name: "bad log level", toml: "log_level = \"loud\"\n", wantErr: "log_level"},
		{name: "metrics and debug addresses", toml: "metrics_address = \"127.0.0.1:9101\"\ndebug_address = \"unix:///run/x/debug.sock\"\n", check: func(t *testing.T, c Config) {
			if c.MetricsAddress != "127.0.0.1:9101" || c.DebugAddress != "unix:///run/x/debug.sock" {
				t.Fatalf("got %+v", c)
			}
		}},
		{name: "relative unix metrics socket", toml: "metrics_address = \"unix://run/m.sock\"\n", wantErr: "must be absolute"},
		{name: "metrics address without port", toml: "metrics_address = \"localhost\"\n", wantErr: "metrics_address"},
		{name: "debug on the network", toml: "debug_address = \"0.0.0.0:6060\"\n", wantErr: "only a loopback address"},
		{name: "bad mode", toml: "mode = \"kernel\"\n", wantErr: "mode"},
		{name: "max_stack of one", toml: "max_stack = 1\n", wantErr: "max_stack"},
		{name: "empty root", toml: "root = \"\"\n", wantErr: "root must not be empty"},
		{name: "remap auto by default", toml: "", check: func(t *testing.T, c Config) {
			if c.Remap != "auto" {
				t.Fatalf("remap %q", c.Remap)
			}
		}},
		{name: "remap copy", toml: "remap = \"copy\"\n", check: func(t *testing.T, c Config) {
			if c.Remap != "copy" {
				t.Fatalf("remap %q", c.Remap)
			}
		}},
		{name: "bad remap", toml: "remap = \"chown\"\n", wantErr: `remap "chown": want auto`},
		{name: "dedupe off by default", toml: "", check: func(t *testing.T, c Config) {
			if c.Dedupe != "off" || c.DedupeMinSize != 1 || c.DedupeCommitMinSize != 64<<10 {
				t.Fatalf("dedupe %q min %d commit min %d", c.Dedupe, c.DedupeMinSize, c.DedupeCommitMinSize)
			}
		}},
		{name: "dedupe on", toml: "dedupe = \"background\"\ndedupe_min_size = 4096\n", check: func(t *testing.T, c Config) {
			if c.Dedupe != "background" || c.DedupeMinSize != 4096 {
				t.Fatalf("dedupe %q min %d", c.Dedupe, c.DedupeMinSize)
			}
		}},
		{name: "limit_backend auto by default", toml: "", check: func(t *testing.T, c Config) {
			if c.LimitBackend != "auto" {
				t.Fatalf("limit_backend %q", c.LimitBackend)
			}
		}},
		{name: "limit_backend image", toml: "limit_backend = \"image\"\n", check: func(t *testing.T, c Config) {
			if c.LimitBackend != "image" {
				t.Fatalf("limit_backend %q", c.LimitBackend)
			}
		}},
		{name: "bad limit_backend", toml: "limit_backend = \"xfs\"\n", wantErr: "limit_backend \"xfs\""},
		{name: "bad dedupe", toml: "dedupe = \"always\"\n", wantErr: "dedupe \"always\""},
		{name: "negative dedupe_min_size", toml: "dedupe_min_size = -1\n", wantErr: "dedupe_min_size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			err := Parse([]byte(tc.toml), &c)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("want error containing %q, got %v", tc.wantErr, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}

func TestLoadMissing(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "none.toml")
	if _, err := Load(missing, true); err != nil {
		t.Fatalf("missing default file must mean defaults: %v", err)
	}
	if _, err := Load(missing, false); err == nil {
		t.Fatal("a missing file the user named must be an error")
	}
}

func TestEncodeRoundTrip(t *testing.T) {
	c := Default()
	c.MountOptions = []string{"metacopy=on"}
	data, err := c.Encode()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	back, err := Load(p, false)
	if err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
	if back.Root != c.Root || back.MountOptions[0] != "metacopy=on" || back.ShutdownTimeout != c.ShutdownTimeout {
		t.Fatalf("round trip: %+v != %+v", back, c)
	}
}
