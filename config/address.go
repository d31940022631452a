package config

import (
	"fmt"
	"net"
	"strings"
)

// unixScheme marks a listen address that is a unix socket path.
const unixScheme = "unix://"

// ListenAddress splits a metrics or debug address into what net.Listen
// takes: "unix:///path" is a unix socket, anything else "host:port" TCP.
func ListenAddress(address string) (network, addr string, err error) {
	if path, ok := strings.CutPrefix(address, unixScheme); ok {
		if !strings.HasPrefix(path, "/") {
			return "", "", fmt.Errorf("%q: a unix socket path must be absolute (unix:///path)", address)
		}
		return "unix", path, nil
	}
	if _, _, err := net.SplitHostPort(address); err != nil {
		return "", "", fmt.Errorf("%q: want host:port or unix:///path: %w", address, err)
	}
	return "tcp", address, nil
}

// localOnly rejects a TCP address that is not on the loopback interface.
// pprof hands out heap dumps (the paths and labels of every snapshot) and
// lets anyone who reaches it burn CPU on profiles: it must never listen on
// the node's network.
func localOnly(address string) error {
	if _, _, err := ListenAddress(address); err != nil {
		return err
	}
	if !IsLocal(address) {
		return fmt.Errorf("%q: only a loopback address (127.0.0.1:PORT) or a unix socket is allowed", address)
	}
	return nil
}

// IsLocal reports whether a valid listen address is reachable from this
// node only: a unix socket, localhost or a loopback IP. An empty host
// ("":PORT) listens on every interface and is not local.
func IsLocal(address string) bool {
	network, addr, err := ListenAddress(address)
	if err != nil {
		return false
	}
	if network == "unix" {
		return true
	}
	host, _, _ := net.SplitHostPort(addr)
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
