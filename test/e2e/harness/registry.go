package harness

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// RegistryBin is Debian's docker-registry (distribution 2.8).
const RegistryBin = "/usr/bin/docker-registry"

// Registry is a plain-HTTP docker-registry on 127.0.0.1.
type Registry struct {
	Host string // 127.0.0.1:port, the prefix of image references
	Log  string

	proc *process
}

// StartRegistry starts docker-registry with its storage under dir on a free
// port.
func StartRegistry(ctx context.Context, dir string, logf Logf) (*Registry, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	r := &Registry{Host: fmt.Sprintf("127.0.0.1:%d", port), Log: filepath.Join(dir, "registry.log")}
	config := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "registry"), r.Host)
	cfgPath := filepath.Join(dir, "registry.yml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		return nil, err
	}
	p, err := startProcess("docker-registry", r.Log, os.Environ(), RegistryBin, "serve", cfgPath)
	if err != nil {
		return nil, err
	}
	r.proc = p
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err = waitFor(wctx, p, "registry", func() error {
		resp, err := http.Get("http://" + r.Host + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		_ = p.stop()
		return nil, err
	}
	logf("registry up on %s", r.Host)
	return r, nil
}

// Stop stops the registry.
func (r *Registry) Stop() error {
	if r == nil || r.proc == nil {
		return nil
	}
	return r.proc.stop()
}

// freePort asks the kernel for a free TCP port on 127.0.0.1. Another
// process may take it before the registry binds it; the registry then fails
// to start and says so.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
