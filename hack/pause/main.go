// Command pause is the pod sandbox process of the testbed node: it holds a pod's namespaces
// open and does nothing else. The upstream pause image cannot be pulled (no registry is reachable
// from the build machines), so this stands in for it. Like upstream pause, it exits 0 on SIGTERM
// or SIGINT and reaps orphaned children, since it is PID 1 of the pod when the PID namespace is
// shared.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
