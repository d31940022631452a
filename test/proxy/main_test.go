package proxy

import (
	"os"
	"testing"

	"github.com/overclone/overclone/test/builtin"
)

func TestMain(m *testing.M) {
	// BenchmarkCalls serves the built-in from this binary executed again
	// (test/builtin), the like of the daemon in a process of its own.
	builtin.ServeIfAsked()
	os.Exit(m.Run())
}
