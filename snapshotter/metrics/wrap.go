package metrics

import (
	"context"
	"errors"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// The method label values, one per snapshotter call.
const (
	methodStat    = "Stat"
	methodUpdate  = "Update"
	methodUsage   = "Usage"
	methodMounts  = "Mounts"
	methodPrepare = "Prepare"
	methodView    = "View"
	methodCommit  = "Commit"
	methodRemove  = "Remove"
	methodWalk    = "Walk"
	methodCleanup = "Cleanup"
)

var methods = []string{methodStat, methodUpdate, methodUsage, methodMounts, methodPrepare, methodView, methodCommit, methodRemove, methodWalk, methodCleanup}

// Snapshotter times and counts the calls of the snapshotter it wraps and
// otherwise passes them through untouched.
type Snapshotter struct {
	sn snapshots.Snapshotter
}

var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

// Wrap returns sn with every call measured.
func Wrap(sn snapshots.Snapshotter) *Snapshotter {
	return &Snapshotter{sn: sn}
}

// observe starts timing a call of method; the returned function records
// its duration and, if it failed, its error class.
func observe(method string) func(error) {
	start := time.Now()
	inFlight := callsInFlight.WithLabelValues(method)
	inFlight.Inc()
	return func(err error) {
		inFlight.Dec()
		callLatency.WithLabelValues(method).Observe(time.Since(start).Seconds())
		if err != nil {
			callErrors.WithLabelValues(method, Class(err)).Inc()
		}
	}
}

// classes maps errdefs classes to label values, most specific first.
var classes = []struct {
	is   func(error) bool
	name string
}{
	{errdefs.IsNotFound, "not_found"},
	{errdefs.IsAlreadyExists, "already_exists"},
	{errdefs.IsFailedPrecondition, "failed_precondition"},
	{errdefs.IsInvalidArgument, "invalid_argument"},
	{errdefs.IsConflict, "conflict"},
	{errdefs.IsNotImplemented, "not_implemented"},
	{errdefs.IsUnavailable, "unavailable"},
	{errdefs.IsPermissionDenied, "permission_denied"},
	{errdefs.IsResourceExhausted, "resource_exhausted"},
	{errdefs.IsOutOfRange, "out_of_range"},
	{errdefs.IsAborted, "aborted"},
	{errdefs.IsInternal, "internal"},
	{func(err error) bool { return errors.Is(err, context.Canceled) }, "canceled"},
	{func(err error) bool { return errors.Is(err, context.DeadlineExceeded) }, "deadline_exceeded"},
}

// Class names err's errdefs class as the error counter labels it; an
// error of no class is "unknown", which is what an operator should alert
// on: every expected failure of a snapshotter call has a class.
func Class(err error) string {
	for _, c := range classes {
		if c.is(err) {
			return c.name
		}
	}
	return "unknown"
}

func (s *Snapshotter) Stat(ctx context.Context, key string) (_ snapshots.Info, err error) {
	defer func(done func(error)) { done(err) }(observe(methodStat))
	return s.sn.Stat(ctx, key)
}

func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (_ snapshots.Info, err error) {
	defer func(done func(error)) { done(err) }(observe(methodUpdate))
	return s.sn.Update(ctx, info, fieldpaths...)
}

func (s *Snapshotter) Usage(ctx context.Context, key string) (_ snapshots.Usage, err error) {
	defer func(done func(error)) { done(err) }(observe(methodUsage))
	return s.sn.Usage(ctx, key)
}

func (s *Snapshotter) Mounts(ctx context.Context, key string) (_ []mount.Mount, err error) {
	defer func(done func(error)) { done(err) }(observe(methodMounts))
	return s.sn.Mounts(ctx, key)
}

func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) (_ []mount.Mount, err error) {
	defer func(done func(error)) { done(err) }(observe(methodPrepare))
	return s.sn.Prepare(ctx, key, parent, opts...)
}

func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) (_ []mount.Mount, err error) {
	defer func(done func(error)) { done(err) }(observe(methodView))
	return s.sn.View(ctx, key, parent, opts...)
}

func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) (err error) {
	defer func(done func(error)) { done(err) }(observe(methodCommit))
	return s.sn.Commit(ctx, name, key, opts...)
}

func (s *Snapshotter) Remove(ctx context.Context, key string) (err error) {
	defer func(done func(error)) { done(err) }(observe(methodRemove))
	return s.sn.Remove(ctx, key)
}

func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) (err error) {
	defer func(done func(error)) { done(err) }(observe(methodWalk))
	return s.sn.Walk(ctx, fn, filters...)
}

// Cleanup passes through to the wrapped snapshotter if it cleans up.
func (s *Snapshotter) Cleanup(ctx context.Context) (err error) {
	defer func(done func(error)) { done(err) }(observe(methodCleanup))
	c, ok := s.sn.(snapshots.Cleaner)
	if !ok {
		return errdefs.ErrNotImplemented
	}
	return c.Cleanup(ctx)
}

// Close closes the wrapped snapshotter; it is not a call worth timing.
func (s *Snapshotter) Close() error {
	return s.sn.Close()
}
