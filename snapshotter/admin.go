package snapshotter

import (
	"context"
	"encoding/json"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The admin service answers what the snapshots API cannot ask: the daemon
// holds the metadata database's lock, so the admin CLI asks it over the
// same socket. Its messages are protobuf's well-known types (the answer a
// JSON document in a StringValue), so it needs no generated code.
const (
	adminService = "overclone.admin.v1.Admin"
	// AdminOrphansMethod is the full gRPC method name of the orphan listing.
	AdminOrphansMethod = "/" + adminService + "/Orphans"
	// AdminCollectMethod is the full gRPC method name of Collect.
	AdminCollectMethod = "/" + adminService + "/Collect"
)

// RegisterAdmin serves s's admin service on srv.
func RegisterAdmin(srv *grpc.Server, s *Snapshotter) {
	srv.RegisterService(&grpc.ServiceDesc{
		ServiceName: adminService,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: "Orphans",
			Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
				if err := dec(&emptypb.Empty{}); err != nil {
					return nil, err
				}
				orphans, err := s.Orphans(ctx)
				if err != nil {
					return nil, errgrpc.ToGRPC(err)
				}
				out, err := json.Marshal(orphans)
				if err != nil {
					return nil, err
				}
				return wrapperspb.String(string(out)), nil
			},
		}, {
			MethodName: "Collect",
			Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
				if err := dec(&emptypb.Empty{}); err != nil {
					return nil, err
				}
				if err := s.Collect(ctx); err != nil {
					return nil, errgrpc.ToGRPC(err)
				}
				return &emptypb.Empty{}, nil
			},
		}, adminSharing(s)},
		Streams: []grpc.StreamDesc{adminDedupe(s)},
	}, s)
}

// AskOrphans asks a daemon's admin service for its orphans.
func AskOrphans(ctx context.Context, conn grpc.ClientConnInterface) ([]Orphan, error) {
	var out wrapperspb.StringValue
	if err := conn.Invoke(ctx, AdminOrphansMethod, &emptypb.Empty{}, &out); err != nil {
		return nil, errgrpc.ToNative(err)
	}
	var orphans []Orphan
	if err := json.Unmarshal([]byte(out.Value), &orphans); err != nil {
		return nil, err
	}
	return orphans, nil
}

// AskCollect asks a daemon's admin service to Collect: Cleanup, then wait
// until what it put in the trash is deleted.
func AskCollect(ctx context.Context, conn grpc.ClientConnInterface) error {
	if err := conn.Invoke(ctx, AdminCollectMethod, &emptypb.Empty{}, &emptypb.Empty{}); err != nil {
		return errgrpc.ToNative(err)
	}
	return nil
}
