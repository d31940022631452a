package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/snapshotter/metrics"
)

// healthCheckTimeout bounds /healthz: a probe that hangs on a wedged disk
// is as bad as one that lies, and kubelet's default probe timeout is 1 s.
const healthCheckTimeout = time.Second

// readHeaderTimeout stops a client that never finishes its request headers
// from holding a connection forever.
const readHeaderTimeout = 10 * time.Second

// serveMetrics serves /metrics and /healthz on address until the returned
// function is called.
//
// A metrics address off loopback is allowed (Prometheus may scrape from
// another node) but warned about: neither path is authenticated, so
// anyone who reaches it reads the node's snapshot counts and makes the
// daemon read its metadata and write its root, however rarely (both are
// reused for a few seconds).
func serveMetrics(ctx context.Context, address string, sn *snapshotter.Snapshotter) (func(), error) {
	if !config.IsLocal(address) {
		log.G(ctx).WithField("address", address).Warn("metrics address is not loopback or a unix socket: /metrics and /healthz answer anyone who reaches it, unauthenticated")
	}
	mux := http.NewServeMux()
	// The scrape's own Walk goes to the snapshotter unmeasured: scrapes
	// are not calls anyone made.
	reg := metrics.NewRegistry(sn, sn.DBPath())
	// A metric that cannot be gathered (the snapshot count, with the
	// database closed) is left out; the others, which say why, still go
	// out.
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), healthCheckTimeout)
		defer cancel()
		if err := sn.Check(ctx); err != nil {
			log.G(ctx).WithError(err).Warn("health check failed")
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	return serveHTTP(ctx, "metrics", address, mux)
}

// serveDebug serves Go's pprof on address until the returned function is
// called. It has a mux of its own: importing net/http/pprof registers on
// the default mux, which must never be served.
func serveDebug(ctx context.Context, address string) (func(), error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return serveHTTP(ctx, "debug", address, mux)
}

func serveHTTP(ctx context.Context, what, address string, h http.Handler) (func(), error) {
	network, addr, err := config.ListenAddress(address)
	if err != nil {
		return nil, err
	}
	var l net.Listener
	if network == "unix" {
		// The same rules as the gRPC socket: root only, never steal a
		// live socket or remove a file that is not one.
		l, err = listen(ctx, addr)
	} else {
		l, err = net.Listen(network, addr)
	}
	if err != nil {
		return nil, err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: readHeaderTimeout}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.G(ctx).WithError(err).WithField("address", address).Errorf("%s server stopped", what)
		}
	}()
	log.G(ctx).WithField("address", address).Infof("serving %s", what)
	return func() { srv.Close() }, nil
}
