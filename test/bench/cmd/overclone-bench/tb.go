package main

import (
	"fmt"
	"os"
	"testing"
)

// runTB lets the program reuse the test helpers (test/loopfs, test/daemon),
// which take a testing.TB, outside `go test`. Only the methods those
// helpers call are implemented; the embedded nil interface supplies the
// unexported method testing.TB requires, and any other call panics, which
// is what a helper starting to use something new should do here.
type runTB struct {
	testing.TB
	name     string
	tmp      string
	cleanups []func()
}

// fatalError is what Fatal and Skip panic with; runStep recovers it.
type fatalError struct{ msg string }

func (e fatalError) Error() string { return e.msg }

func newRunTB(name, tmp string) *runTB { return &runTB{name: name, tmp: tmp} }

func (t *runTB) Helper()      {}
func (t *runTB) Name() string { return t.name }
func (t *runTB) Cleanup(f func()) {
	t.cleanups = append(t.cleanups, f)
}

func (t *runTB) TempDir() string {
	dir, err := os.MkdirTemp(t.tmp, "tb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (t *runTB) Fatal(args ...any) { panic(fatalError{fmt.Sprint(args...)}) }
func (t *runTB) Fatalf(format string, args ...any) {
	panic(fatalError{fmt.Sprintf(format, args...)})
}
func (t *runTB) Skipf(format string, args ...any) {
	panic(fatalError{"cannot run: " + fmt.Sprintf(format, args...)})
}
func (t *runTB) Errorf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s: %s\n", t.name, fmt.Sprintf(format, args...))
}
func (t *runTB) Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s: %s\n", t.name, fmt.Sprintf(format, args...))
}

// close runs the cleanups, last registered first, as testing does.
func (t *runTB) close() {
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
	t.cleanups = nil
}
