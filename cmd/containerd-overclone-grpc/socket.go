package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
)

// listen opens the unix socket at address, 0660: whoever reaches it
// controls every mount on the node. A directory it creates for the socket
// is 0700; one that exists is left as it is (it may be /run or /tmp, shared
// with everything else), with a warning if others can enter it. A socket
// left by a dead daemon is replaced; one a live daemon answers on is not
// taken over, and a path that is not a socket is never removed.
func listen(ctx context.Context, address string) (net.Listener, error) {
	dir := filepath.Dir(address)
	if fi, err := os.Stat(dir); err == nil {
		if fi.Mode().Perm()&0o077 != 0 {
			log.G(ctx).WithField("dir", dir).WithField("mode", fi.Mode().Perm()).Warn("socket directory is open to others; the socket itself is 0660")
		}
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory %s: %w", dir, err)
	} else if err := os.Chmod(dir, 0o700); err != nil { // past the umask
		return nil, fmt.Errorf("restrict socket directory %s: %w", dir, err)
	}
	if fi, err := os.Lstat(address); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket: not removing it", address)
		}
		if c, err := net.DialTimeout("unix", address, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another daemon is serving on %s", address)
		}
		log.G(ctx).WithField("address", address).Info("replacing stale socket")
		if err := os.Remove(address); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", address, err)
		}
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", address, err)
	}
	if err := os.Chmod(address, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod socket %s: %w", address, err)
	}
	return l, nil
}
