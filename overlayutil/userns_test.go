package overlayutil

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
)

// usernsRootEnv carries the root to the test binary re-run in a user
// namespace by TestProbeInUserNamespace.
const usernsRootEnv = "OVERLAYUTIL_TEST_USERNS_ROOT"

// TestProbeInUserNamespace runs the probe as root of a user namespace (ids
// mapped one to one, so files stay reachable), where the daemon is when it
// runs rootless or in a user-namespaced container: trusted.* xattrs cannot
// be written there, so overlay needs userxattr, and the kernel then refuses
// redirect_dir and metacopy.
func TestProbeInUserNamespace(t *testing.T) {
	if os.Getenv(usernsRootEnv) != "" {
		t.Skip("running inside the user namespace")
	}
	root := filepath.Join(loopfs.Mount(t, loopfs.Ext4), "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	ids := []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 65536}}
	f := probeIn(t, root, &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNS,
		UidMappings: ids,
		GidMappings: ids,
	})
	want := map[string]bool{
		CheckOverlay: true, CheckUserXattrNeeded: true, CheckMultipleLowers: true,
		CheckRedirectDir: false, CheckMetacopy: false,
	}
	for name, ok := range want {
		if c := f.Get(name); c.OK != ok || (!c.OK && c.Reason == "") {
			t.Errorf("%s: ok=%t reason %q, want ok=%t", name, c.OK, c.Reason, ok)
		}
	}
	if !strings.Contains(f.Get(CheckRedirectDir).Reason, "refuses redirect_dir with userxattr") {
		t.Errorf("redirect_dir reason %q does not name the conflict", f.Get(CheckRedirectDir).Reason)
	}
	if !strings.Contains(f.Get(CheckUserXattrNeeded).Reason, "operation not permitted") {
		t.Errorf("userxattr reason %q does not say trusted xattrs are not permitted", f.Get(CheckUserXattrNeeded).Reason)
	}
}

// TestProbeUnprivileged runs the probe as an unprivileged user in the
// initial user namespace: it may not mount at all, and says so.
func TestProbeUnprivileged(t *testing.T) {
	if os.Getenv(usernsRootEnv) != "" {
		t.Skip("running as the child")
	}
	const nobody = 65534
	mnt := loopfs.Mount(t, loopfs.Ext4)
	// The test's temp dirs are 0700; let the unprivileged child reach mnt.
	for d := filepath.Dir(mnt); d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	root := filepath.Join(mnt, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(root, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	// go test builds the binary in a 0700 dir; nobody runs a copy.
	exe := filepath.Join(mnt, "overlayutil.test")
	bin, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	f := probeInExe(t, exe, root, &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}})
	if f.CanServe() {
		t.Error("an unprivileged user can serve overlay snapshots?")
	}
	for name, reason := range map[string]string{
		CheckOverlay:         "no permission to mount",
		CheckUserXattrNeeded: "does not mount",
		CheckMultipleLowers:  "see check overlay",
		CheckReflink:         "operation not supported",
	} {
		if c := f.Get(name); c.OK || !strings.Contains(c.Reason, reason) {
			t.Errorf("%s: ok=%t reason %q, want false and %q", name, c.OK, c.Reason, reason)
		}
	}
}

// probeIn runs Probe(root) in a child test process started with attr and
// returns what it found.
func probeIn(t *testing.T, root string, attr *syscall.SysProcAttr) *Features {
	t.Helper()
	return probeInExe(t, os.Args[0], root, attr)
}

// probeInExe is probeIn with the test binary at exe.
func probeInExe(t *testing.T, exe, root string, attr *syscall.SysProcAttr) *Features {
	t.Helper()
	cmd := exec.Command(exe, "-test.run=^TestUserNamespaceHelper$", "-test.v")
	cmd.Env = append(os.Environ(), usernsRootEnv+"="+root)
	cmd.SysProcAttr = attr
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("probe in the child: %v\n%s", err, out)
	}
	_, js, ok := strings.Cut(string(out), "FEATURES:")
	if !ok {
		t.Fatalf("no findings from the child:\n%s", out)
	}
	js, _, _ = strings.Cut(js, "\n")
	var f Features
	if err := json.Unmarshal([]byte(js), &f); err != nil {
		t.Fatalf("%v: %s", err, js)
	}
	for _, c := range f.Checks {
		t.Logf("%-20s %-5t value=%q reason=%q", c.Name, c.OK, c.Value, c.Reason)
	}
	return &f
}

// TestUserNamespaceHelper is the child side of TestProbeInUserNamespace
// and TestProbeUnprivileged.
func TestUserNamespaceHelper(t *testing.T) {
	root := os.Getenv(usernsRootEnv)
	if root == "" {
		t.Skip("only run by TestProbeInUserNamespace")
	}
	f, err := Probe(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	// Written straight to stdout: t.Log would wrap a long line.
	os.Stdout.WriteString("FEATURES:" + string(b) + "\n")
}
