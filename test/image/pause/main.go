// Command pause is the sandbox image the CRI tests name in containerd's
// config, in place of registry.k8s.io/pause, which the tests cannot fetch:
// a pod's first process, holding its namespaces until the runtime stops it.
// Built static (CGO_ENABLED=0): the image has nothing but this binary.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// As PID 1 of the pod the kernel delivers only the signals it has a
	// handler for: without one SIGTERM would be ignored and every
	// StopPodSandbox would wait for its timeout and SIGKILL.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	os.Exit(0)
}
