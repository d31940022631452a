package differ

import (
	"context"
	"fmt"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"github.com/containerd/containerd/v2/contrib/diffservice"
	contentproxy "github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/core/leases"
	leasesproxy "github.com/containerd/containerd/v2/core/leases/proxy"
	"github.com/containerd/containerd/v2/pkg/dialer"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// LeaseExpiration is how long a layer the daemon wrote is kept from
// containerd's garbage collector when nothing references it yet.
// containerd forwards a proxy differ the caller's namespace but not its
// lease, so the layer cannot join the caller's lease; it gets one of its
// own, as long as the one containerd's client takes by default, which
// leaves any caller the time to reference it (a manifest, an image).
const LeaseExpiration = 24 * time.Hour

// Remote is the daemon's differ: it writes layers to containerd's content
// store over containerd's socket, in the namespace of the call containerd
// forwards.
type Remote struct {
	*Differ
	conn *grpc.ClientConn
}

// NewRemote returns a Differ for the snapshots under root that writes to
// the content store of the containerd listening on address. Nothing is
// dialled until the first Compare.
func NewRemote(root, address string) (*Remote, error) {
	conn, err := grpc.NewClient(dialer.DialAddress(address),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dialer.ContextDialer))
	if err != nil {
		return nil, fmt.Errorf("containerd client for %s: %w", address, err)
	}
	lm := leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(conn))
	d, err := New(root, contentproxy.NewContentStore(conn), WithCallContext(func(ctx context.Context) (context.Context, error) {
		ns, err := namespaces.NamespaceRequired(ctx)
		if err != nil {
			return nil, fmt.Errorf("diff call without a containerd namespace: %w", errdefs.ErrFailedPrecondition)
		}
		// The namespace arrived as incoming metadata; calls to
		// containerd need it as outgoing metadata.
		ctx = namespaces.WithNamespace(ctx, ns)
		l, err := lm.Create(ctx, leases.WithRandomID(), leases.WithExpiration(LeaseExpiration),
			leases.WithLabel("containerd.io/overclone", "diff"))
		if err != nil {
			return nil, fmt.Errorf("lease for the diff in containerd %s: %w", address, err)
		}
		return leases.WithLease(ctx, l.ID), nil
	}))
	if err != nil {
		conn.Close()
		return nil, err
	}
	return &Remote{Differ: d, conn: conn}, nil
}

// Register serves the diff API on srv: Diff through the Differ, Apply
// not implemented, so that containerd's diff service falls through to its
// next differ.
func (r *Remote) Register(srv *grpc.Server) {
	diffapi.RegisterDiffServer(srv, diffservice.FromApplierAndComparer(r.Differ, r.Differ))
}

// Close closes the connection to containerd.
func (r *Remote) Close() error { return r.conn.Close() }
