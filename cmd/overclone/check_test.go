package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/overclone/overclone/overlayutil"
	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

func run(args ...string) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = dispatch(context.Background(), args, &o, &e)
	return code, o.String(), e.String()
}

func TestDispatch(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		err  string
	}{
		{nil, exitUsage, "usage: overclone"},
		{[]string{"help"}, exitOK, "check"},
		{[]string{"frobnicate"}, exitUsage, `unknown command "frobnicate"`},
		{[]string{"check", "--bogus"}, exitUsage, "flag provided but not defined"},
		{[]string{"check", "extra"}, exitUsage, "unexpected arguments"},
	} {
		code, _, stderr := run(tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.err) {
			t.Errorf("overclone %v: exit %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.code, tc.err)
		}
	}
}

func TestCheckTable(t *testing.T) {
	for _, k := range []loopfs.Kind{loopfs.Ext4, loopfs.XFS, loopfs.Btrfs} {
		t.Run(string(k), func(t *testing.T) {
			root := filepath.Join(loopfs.Mount(t, k), "root")
			code, stdout, stderr := run("check", "--root", root)
			t.Logf("overclone check --root %s\n%s", root, stdout)
			if code != exitOK {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			for _, want := range []string{"backing fs:  " + string(k), "kernel:", "can serve:   yes", "CHECK", "RESULT", "REASON", "remap-ids:",
				overlayutil.CheckOverlay, overlayutil.CheckMaxLowers, overlayutil.CheckIntercepts, overlayutil.CheckReflink} {
				if !strings.Contains(stdout, want) {
					t.Errorf("output lacks %q", want)
				}
			}
			for _, line := range strings.Split(stdout, "\n") {
				if strings.HasSuffix(line, " ") {
					t.Errorf("trailing space in %q", line)
				}
			}
			reflink := "reflink              no"
			if k.Reflinks() {
				reflink = "reflink              yes"
			}
			if !strings.Contains(stdout, reflink) {
				t.Errorf("output lacks %q", reflink)
			}
		})
	}
}

func TestCheckJSON(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.Tmpfs), "root")
	code, stdout, stderr := run("check", "--root", root, "--json")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var r struct {
		Root      string              `json:"root"`
		BackingFS string              `json:"backing_fs"`
		Kernel    string              `json:"kernel_release"`
		CanServe  bool                `json:"can_serve"`
		MaxLowers int                 `json:"max_lowers"`
		Checks    []overlayutil.Check `json:"checks"`
	}
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("%v: %s", err, stdout)
	}
	if r.Root != root || r.BackingFS != "tmpfs" || r.Kernel == "" || !r.CanServe || r.MaxLowers != 500 || len(r.Checks) != 13 {
		t.Errorf("report = %+v", r)
	}
	// How user-namespaced snapshots are served follows the probe.
	var remap struct {
		Mode     string `json:"mode"`
		RemapIDs string `json:"remap_ids"`
		Why      string `json:"remap_ids_reason"`
	}
	if err := json.Unmarshal([]byte(stdout), &remap); err != nil {
		t.Fatal(err)
	}
	idmapped := false
	for _, c := range r.Checks {
		if c.Name == overlayutil.CheckIDMapped {
			idmapped = c.OK
		}
	}
	want := snapshotter.RemapChownedCopy
	if remap.Mode == string(snapshotter.ModeOverlay) && idmapped {
		want = snapshotter.RemapIdmapped
	}
	if remap.Mode == "" || remap.RemapIDs != want || remap.Why == "" {
		t.Errorf("mode %q remap_ids %q (%q), want %q with idmapped-mounts %t", remap.Mode, remap.RemapIDs, remap.Why, want, idmapped)
	}
}

// TestCheckRemapCopy: with the daemon's remap = "copy" check says mapped
// snapshots get the shifted copy whatever the kernel has, and why; a
// setting the daemon would refuse is a usage error.
func TestCheckRemapCopy(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.Tmpfs), "root")
	code, stdout, stderr := run("check", "--root", root, "--mode", "overlay", "--remap", "copy")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	want := "remap-ids:   " + snapshotter.RemapChownedCopy + ": "
	if !strings.Contains(stdout, want) || !strings.Contains(stdout, `remap = "copy" in the config`) {
		t.Errorf("check --remap copy does not say %q and why:\n%s", want, stdout)
	}
	code, _, stderr = run("check", "--root", root, "--remap", "chown")
	if code != exitUsage || !strings.Contains(stderr, `remap "chown": want auto or copy`) {
		t.Errorf("check --remap chown: exit %d, %s", code, stderr)
	}
}

// TestCheckFailsOnOverlay: a root inside an overlay cannot serve, and the
// exit code says so for scripts.
func TestCheckFailsOnOverlay(t *testing.T) {
	base := loopfs.Mount(t, loopfs.Tmpfs)
	for _, d := range []string{"l", "u", "w", "m"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m := filepath.Join(base, "m")
	if err := unix.Mount("overlay", m, "overlay", 0, "lowerdir="+base+"/l,upperdir="+base+"/u,workdir="+base+"/w"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(m, unix.MNT_DETACH) })
	code, stdout, stderr := run("check", "--root", filepath.Join(m, "root"))
	if code != exitFail || !strings.Contains(stderr, "cannot serve") || !strings.Contains(stdout, "is itself on overlayfs") {
		t.Errorf("exit %d\nstdout %s\nstderr %s", code, stdout, stderr)
	}
}

// TestCheckLimits: check says how size limits and Usage are served: an
// ext4 image per limited snapshot in overlay mode, refused in userspace
// mode with the reason; usage_max_age shows in the Usage line.
func TestCheckLimits(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.Ext4), "root")
	for _, tc := range []struct{ mode, limits, usage string }{
		{"overlay", "size limits: yes: ext4 image per limited snapshot", "usage:       limited snapshots: statfs of their image (no walk); unlimited snapshots: a walk of the upper, reused for up to 30s"},
		{"userspace", "size limits: no: userspace mode", "usage:       unlimited snapshots: a walk of the upper, reused for up to 30s"},
	} {
		code, stdout, stderr := run("check", "--root", root, "--mode", tc.mode, "--usage-max-age", "30s")
		if code != exitOK {
			t.Fatalf("--mode %s: exit %d: %s", tc.mode, code, stderr)
		}
		for _, want := range []string{tc.limits, tc.usage} {
			if !strings.Contains(stdout, want) {
				t.Errorf("--mode %s: output lacks %q:\n%s", tc.mode, want, stdout)
			}
		}
	}
}

// TestCheckLeavesMissingRootAlone: a --root that does not exist (a typo, or
// a check before the daemon's first start) is probed on the filesystem it
// would be made on, and neither it nor anything else is left behind.
func TestCheckLeavesMissingRootAlone(t *testing.T) {
	parent := loopfs.Mount(t, loopfs.Tmpfs)
	root := filepath.Join(parent, "typo", "root")
	code, stdout, stderr := run("check", "--root", root, "--json")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var r struct {
		Root        string `json:"root"`
		RootMissing bool   `json:"root_missing"`
		BackingFS   string `json:"backing_fs"`
	}
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("%v: %s", err, stdout)
	}
	if r.Root != root || !r.RootMissing || r.BackingFS != "tmpfs" {
		t.Errorf("report = %+v", r)
	}
	left, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range left {
		t.Errorf("check left %s in %s", e.Name(), parent)
	}

	code, stdout, _ = run("check", "--root", root)
	if code != exitOK || !strings.Contains(stdout, "does not exist yet") {
		t.Errorf("exit %d, text check does not say the root is missing:\n%s", code, stdout)
	}
}

// TestCheckLimitsBtrfs: on a btrfs root, check says which size-limit
// mechanism applies: without quotas an image, with the command that
// would enable them; with quotas a subvolume per limited snapshot and
// Usage from its qgroup; with --limit-backend image an image again.
func TestCheckLimitsBtrfs(t *testing.T) {
	mnt := loopfs.Mount(t, loopfs.Btrfs)
	root := filepath.Join(mnt, "root")
	for _, tc := range []struct {
		quotas  bool
		backend string
		want    []string
	}{
		{false, "auto", []string{"size limits: yes: ext4 image per limited snapshot", "btrfs quota enable " + root}},
		{true, "auto", []string{"size limits: yes: btrfs subvolume per limited snapshot, its qgroup limited (quota mode qgroup", "usage:       limited snapshots: their btrfs qgroup's counters"}},
		{true, "image", []string{"size limits: yes: ext4 image per limited snapshot"}},
	} {
		if tc.quotas {
			loopfs.EnableQuotas(t, mnt, loopfs.Qgroups)
		}
		code, stdout, stderr := run("check", "--root", root, "--mode", "overlay", "--limit-backend", tc.backend)
		if code != exitOK {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		for _, want := range tc.want {
			if !strings.Contains(stdout, want) {
				t.Errorf("quotas %v, --limit-backend %s: output lacks %q:\n%s", tc.quotas, tc.backend, want, stdout)
			}
		}
	}
}
