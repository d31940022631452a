package fileops

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// crashEnv carries what TestStagingCrashHelper is to do: mode, upper,
// lower, work dir ("" for none) and host source, separated by "|".
const crashEnv = "FILEOPS_CRASH"

// TestStagingCrashHelper is no test of its own: TestStagingLeftovers runs
// the test binary again with crashEnv set, and this kills the process with
// SIGKILL when a copy has its entry staged and not yet renamed in.
func TestStagingCrashHelper(t *testing.T) {
	spec := os.Getenv(crashEnv)
	if spec == "" {
		t.Skip("runs only as TestStagingLeftovers' crashing child")
	}
	p := strings.Split(spec, "|")
	var opts []StackOpt
	if p[3] != "" {
		opts = append(opts, WithWorkDir(p[3]))
	}
	s, err := NewStack(p[1], []string{p[2]}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	stagedHook = func() { unix.Kill(os.Getpid(), unix.SIGKILL) }
	ctx := context.Background()
	switch p[0] {
	case "copyin":
		_, err = s.CopyIn(ctx, p[4], "newtree")
	case "copyup":
		_, err = s.CopyUp(ctx, "d/sym")
	}
	t.Fatalf("%s did not crash: %v", p[0], err)
}

// crash runs the helper and expects it to die by SIGKILL.
func crash(t *testing.T, mode, upper, lower, work, src string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestStagingCrashHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashEnv+"="+strings.Join([]string{mode, upper, lower, work, src}, "|"))
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("crash helper %s: %v: %s", mode, err, out)
	}
}

// withoutStaging drops staging names, and what lies below them, from a
// tree read off the kernel's mount.
func withoutStaging(tr tree) (tree, []string) {
	out := tree{}
	var seen []string
	for p, n := range tr {
		hide := false
		for _, c := range splitPath(p) {
			if isStagingName(c) {
				hide = true
			}
		}
		if !hide {
			out[p] = n
		} else if _, name := parentName(p); isStagingName(name) {
			seen = append(seen, p)
		}
	}
	sort.Strings(seen)
	return out, seen
}

// TestStagingLeftovers crashes copies between staging and rename, in a
// child process, and checks that the kernel's mount shows the leftovers
// while fileops' Resolve, ReadDir and Flatten never do, and that
// CleanStaging removes exactly the stale ones, after which the kernel's
// view equals fileops' again.
func TestStagingLeftovers(t *testing.T) {
	needRoot(t)
	for _, k := range testKinds {
		t.Run(string(k), func(t *testing.T) {
			ctx := context.Background()
			mnt := loopfs.Mount(t, k)
			lower, upper, work := filepath.Join(mnt, "lower"), filepath.Join(mnt, "upper"), filepath.Join(mnt, "work")
			mustWrite(t, filepath.Join(lower, "d/f"), []byte("f"), 0o644)
			mustSymlink(t, "f", filepath.Join(lower, "d/sym"))
			mustMkdir(t, filepath.Join(upper, "d"))
			mustMkdir(t, work)
			host := filepath.Join(mnt, "host")
			mustWrite(t, filepath.Join(host, "tree/a/b"), []byte("b"), 0o644)
			mustSymlink(t, "a/b", filepath.Join(host, "tree/s"))

			crash(t, "copyin", upper, lower, "", filepath.Join(host, "tree"))
			crash(t, "copyup", upper, lower, "", "")
			crash(t, "copyin", upper, lower, work, filepath.Join(host, "tree"))
			// Leftovers of a live process (pid 1), of this process but not
			// being built, and one this process is building now.
			live := stagingPrefix + "1-7"
			mustWrite(t, filepath.Join(upper, live), nil, 0o600)
			mine := stagingPrefix + strconv.Itoa(os.Getpid()) + "-999999999"
			mustMkdir(t, filepath.Join(upper, "d", mine, "x"))
			busy := newStagingName()
			mustWrite(t, filepath.Join(upper, busy), nil, 0o600)
			released := false
			defer func() {
				if !released {
					releaseStagingName(busy)
				}
			}()

			merged := mountOverlay(t, "", []string{upper, lower}, "")
			kernel, _ := walkTree(t, merged, skipOverlayXattrs)
			want, leftovers := withoutStaging(kernel)
			t.Logf("the kernel shows %v", leftovers)
			if len(leftovers) != 5 {
				t.Errorf("the kernel shows leftovers %v, want the two crashes in the upper, %s, %s and %s", leftovers, live, mine, busy)
			}
			s, err := NewStack(upper, []string{lower})
			if err != nil {
				t.Fatal(err)
			}
			compareTrees(t, "Resolve/ReadDir vs the kernel without staging names", want, stackTree(t, s), true, nil)
			flat := filepath.Join(mnt, "flat")
			if _, err := Flatten(ctx, s, flat); err != nil {
				t.Fatal(err)
			}
			flatTree, _ := walkTree(t, flat, skipOverlayXattrs)
			compareTrees(t, "Flatten vs the kernel without staging names", want, flatTree, true, nil)
			for _, p := range leftovers {
				if _, err := s.Resolve(p); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("Resolve(%q) of a staging name: %v", p, err)
				}
			}
			unmountOverlay(t, merged)

			sw, err := NewStack(upper, []string{lower}, WithWorkDir(work))
			if err != nil {
				t.Fatal(err)
			}
			removed, err := sw.CleanStaging(ctx, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("CleanStaging removed %v", removed)
			var inWork, inUpper []string
			for _, r := range removed {
				if strings.HasPrefix(r, work+"/") {
					inWork = append(inWork, r)
				} else {
					inUpper = append(inUpper, r)
				}
			}
			if len(inWork) != 1 || len(inUpper) != 3 || !contains(inUpper, "d/"+mine) || contains(removed, live) || contains(removed, busy) {
				t.Errorf("CleanStaging(1h) removed %v; want the three crashes and %s, not %s or %s", removed, mine, live, busy)
			}
			if removed, err = sw.CleanStaging(ctx, 0); err != nil || sprint(removed) != "["+live+"]" {
				t.Errorf("CleanStaging(0) removed %v, %v; want only %s (not the busy %s)", removed, err, live, busy)
			}
			releaseStagingName(busy)
			released = true
			if removed, err = sw.CleanStaging(ctx, time.Hour); err != nil || sprint(removed) != "["+busy+"]" {
				t.Errorf("CleanStaging after release removed %v, %v; want %s", removed, err, busy)
			}
			if ents, _ := os.ReadDir(work); len(ents) != 0 {
				t.Errorf("work dir keeps %d entries", len(ents))
			}
			merged = mountOverlay(t, "", []string{upper, lower}, "")
			kernel, _ = walkTree(t, merged, skipOverlayXattrs)
			compareTrees(t, "the kernel after CleanStaging vs fileops", kernel, stackTree(t, s), true, nil)
		})
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
