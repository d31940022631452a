package metrics

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
)

// TestClass: every errdefs class gets its label, wrapped or after a trip
// through gRPC status codes; anything else is "unknown".
func TestClass(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("stat %q: %w", "k", errdefs.ErrNotFound), "not_found"},
		{errgrpc.ToNative(errgrpc.ToGRPC(errdefs.ErrAlreadyExists)), "already_exists"},
		{fmt.Errorf("x: %w", errdefs.ErrFailedPrecondition), "failed_precondition"},
		{errdefs.ErrInvalidArgument, "invalid_argument"},
		{fmt.Errorf("walk: %w", context.Canceled), "canceled"},
		{errors.New("disk on fire"), "unknown"},
	} {
		if got := Class(tc.err); got != tc.want {
			t.Errorf("Class(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}
