package snapshotter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sort"
	"syscall"
	"unsafe"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	// AdminDedupeMethod is the full gRPC method name of a dedupe pass:
	// the request a BoolValue (dry run), then one StringValue per layer
	// (a DedupeResult in JSON) and a last one with the DedupeSummary.
	AdminDedupeMethod = "/" + adminService + "/Dedupe"
	// AdminSharingMethod is the full gRPC method name of Sharing.
	AdminSharingMethod = "/" + adminService + "/Sharing"
)

var dedupeStream = grpc.StreamDesc{StreamName: "Dedupe", ServerStreams: true}

// adminDedupe serves a dedupe pass, streaming its progress.
func adminDedupe(s *Snapshotter) grpc.StreamDesc {
	d := dedupeStream
	d.Handler = func(_ any, stream grpc.ServerStream) error {
		var dry wrapperspb.BoolValue
		if err := stream.RecvMsg(&dry); err != nil {
			return err
		}
		send := func(v any) error {
			out, err := json.Marshal(v)
			if err != nil {
				return err
			}
			return stream.SendMsg(wrapperspb.String(string(out)))
		}
		var sendErr error
		sum, err := s.Dedupe(stream.Context(), dry.Value, func(r DedupeResult) {
			if sendErr == nil {
				sendErr = send(r)
			}
		})
		if err != nil {
			return errgrpc.ToGRPC(err)
		}
		if sendErr != nil {
			return sendErr
		}
		return send(sum)
	}
	return d
}

// adminSharing serves Sharing.
func adminSharing(s *Snapshotter) grpc.MethodDesc {
	return grpc.MethodDesc{
		MethodName: "Sharing",
		Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			if err := dec(&emptypb.Empty{}); err != nil {
				return nil, err
			}
			sh, err := s.Sharing(ctx)
			if err != nil {
				return nil, errgrpc.ToGRPC(err)
			}
			out, err := json.Marshal(sh)
			if err != nil {
				return nil, err
			}
			return wrapperspb.String(string(out)), nil
		},
	}
}

// AskDedupe runs a dedupe pass on a daemon, calling progress for each
// layer as it is done.
func AskDedupe(ctx context.Context, conn grpc.ClientConnInterface, dryRun bool, progress func(DedupeResult)) (DedupeSummary, error) {
	var sum DedupeSummary
	stream, err := conn.NewStream(ctx, &dedupeStream, AdminDedupeMethod)
	if err != nil {
		return sum, errgrpc.ToNative(err)
	}
	if err := stream.SendMsg(wrapperspb.Bool(dryRun)); err != nil {
		return sum, errgrpc.ToNative(err)
	}
	if err := stream.CloseSend(); err != nil {
		return sum, errgrpc.ToNative(err)
	}
	var last string
	for {
		var msg wrapperspb.StringValue
		if err := stream.RecvMsg(&msg); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return sum, errgrpc.ToNative(err)
		}
		if last != "" {
			var r DedupeResult
			if err := json.Unmarshal([]byte(last), &r); err != nil {
				return sum, err
			}
			if progress != nil {
				progress(r)
			}
		}
		last = msg.Value
	}
	if last == "" {
		return sum, fmt.Errorf("dedupe: the daemon sent no summary")
	}
	return sum, json.Unmarshal([]byte(last), &sum)
}

// AskSharing asks a daemon for every snapshot's shared and exclusive bytes.
func AskSharing(ctx context.Context, conn grpc.ClientConnInterface) ([]SnapshotSharing, error) {
	var out wrapperspb.StringValue
	if err := conn.Invoke(ctx, AdminSharingMethod, &emptypb.Empty{}, &out); err != nil {
		return nil, errgrpc.ToNative(err)
	}
	var sh []SnapshotSharing
	return sh, json.Unmarshal([]byte(out.Value), &sh)
}

// SnapshotSharing is what a snapshot's own directory holds, as the
// kernel's extent map (FIEMAP_EXTENT_SHARED) tells it: bytes in extents
// another file (in this snapshot or another, or a flattened layer) shares,
// and bytes in extents of its own. A layer's directory only: the layers
// below a snapshot are their own snapshots.
type SnapshotSharing struct {
	Key       string `json:"key"`
	Kind      string `json:"kind"`
	Shared    int64  `json:"shared"`
	Exclusive int64  `json:"exclusive"`
}

// Sharing measures every snapshot's directory with FIEMAP. It reads every
// file's extent map: an admin's question, not one for CRI's polling.
func (s *Snapshotter) Sharing(ctx context.Context) ([]SnapshotSharing, error) {
	type snap struct {
		id, key string
		kind    snapshots.Kind
	}
	var snaps []snap
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := idMap(ctx)
		if err != nil {
			return err
		}
		for id, key := range ids {
			_, info, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return err
			}
			snaps = append(snaps, snap{id, key, info.Kind})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(snaps, func(i, j int) bool { return snaps[i].key < snaps[j].key })
	out := make([]SnapshotSharing, 0, len(snaps))
	for _, sn := range snaps {
		shared, excl, err := extentSplit(ctx, s.upperPath(sn.id))
		if err != nil {
			if os.IsNotExist(err) {
				continue // removed meanwhile
			}
			return nil, fmt.Errorf("sharing of %q: %w", sn.key, err)
		}
		out = append(out, SnapshotSharing{Key: sn.key, Kind: sn.kind.String(), Shared: shared, Exclusive: excl})
	}
	return out, nil
}

// extentSplit sums the extents of dir's regular files into shared and
// exclusive bytes (each inode once); other inodes' blocks are exclusive.
func extentSplit(ctx context.Context, dir string) (shared, exclusive int64, err error) {
	err = walkInodes(ctx, dir, func(path string, d fs.DirEntry, st *syscall.Stat_t) error {
		if !d.Type().IsRegular() {
			exclusive += st.Blocks * 512
			return nil
		}
		sh, ex, err := fileExtents(path)
		if err != nil {
			return err
		}
		shared += sh
		exclusive += ex
		return nil
	})
	return shared, exclusive, err
}

// fileExtents sums one file's extents by FIEMAP_EXTENT_SHARED. Where the
// filesystem has no extent map (tmpfs), every block is the file's own.
func fileExtents(path string) (shared, exclusive int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	fm := &fiemap{}
	for start := uint64(0); ; {
		*fm = fiemap{Start: start, Length: ^uint64(0) - start, Flags: fiemapFlagSync, ExtentCount: fiemapBatch}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(fm))); errno != 0 {
			if errno == unix.EOPNOTSUPP {
				var st unix.Stat_t
				if err := unix.Fstat(int(f.Fd()), &st); err != nil {
					return 0, 0, err
				}
				return 0, st.Blocks * 512, nil
			}
			return 0, 0, fmt.Errorf("FIEMAP %s: %w", path, errno)
		}
		if fm.MappedExtents == 0 {
			return shared, exclusive, nil
		}
		for _, e := range fm.Extents[:fm.MappedExtents] {
			if e.Flags&fiemapExtentShared != 0 {
				shared += int64(e.Length)
			} else {
				exclusive += int64(e.Length)
			}
			if e.Flags&fiemapExtentLast != 0 {
				return shared, exclusive, nil
			}
			start = e.Logical + e.Length
		}
	}
}
