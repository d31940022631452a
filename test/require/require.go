// Package require is how a test says the machine lacks something it needs:
// root, a tool, a kernel or filesystem capability. By default the test is
// skipped with the reason. With OVERCLONE_STRICT=1 (CI sets it) it fails
// with the same reason instead, so that a machine missing a package cannot
// turn whole suites into a green run that tested nothing.
//
// Skips that are not about the machine (testing.Short, a re-executed
// child process, a measurement run on request) stay plain t.Skip.
//
// It imports nothing of overclone's, so every test package, including the
// in-package tests of fileops, overlayutil and snapshotter, can use it.
package require

import (
	"fmt"
	"os"
	"testing"
)

// StrictEnv names the switch.
const StrictEnv = "OVERCLONE_STRICT"

// Strict reports whether a missing tool or capability fails the test.
func Strict() bool {
	v := os.Getenv(StrictEnv)
	return v != "" && v != "0"
}

// Skipf skips t because the machine lacks something, or fails it under
// OVERCLONE_STRICT=1.
func Skipf(t testing.TB, format string, args ...any) {
	t.Helper()
	if Strict() {
		t.Fatalf("%s (%s is set: what a test needs must be there)", fmt.Sprintf(format, args...), StrictEnv)
	}
	t.Skipf(format, args...)
}

// Skip is Skipf with the arguments formatted as t.Skip formats them.
func Skip(t testing.TB, args ...any) {
	t.Helper()
	Skipf(t, "%s", fmt.Sprint(args...))
}

// Root skips (or fails) a test that is not running as root.
func Root(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skipf(t, "needs root: %s", why)
	}
}
