package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
)

// measureApart runs this program once per filesystem and merges what the
// runs measured into rep. A signal to this process is passed on, so that
// the child unmounts its loop filesystem.
func measureApart(rep *Report, kinds []loopfs.Kind, quick bool, only string) error {
	tmp, err := os.MkdirTemp("", "overclone-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	var (
		mu  sync.Mutex
		cur *exec.Cmd
	)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		for sig := range sigs {
			mu.Lock()
			if cur != nil && cur.Process != nil {
				cur.Process.Signal(sig)
			}
			mu.Unlock()
		}
	}()
	for _, kind := range kinds {
		file := filepath.Join(tmp, string(kind)+".json")
		args := []string{"-fs", string(kind), "-only", only, "-child", file}
		if quick {
			args = append(args, "-quick")
		}
		cmd := exec.Command(os.Args[0], args...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		mu.Lock()
		err := cmd.Start()
		cur = cmd
		mu.Unlock()
		if err != nil {
			return err
		}
		if err := cmd.Wait(); err != nil {
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.ExitStatus() == 130 {
				return fmt.Errorf("interrupted")
			}
			rep.note("%s: the run failed: %v", kind, err)
			continue
		}
		js, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		var part Report
		if err := json.Unmarshal(js, &part); err != nil {
			return fmt.Errorf("read %s results: %w", kind, err)
		}
		rep.Results = append(rep.Results, part.Results...)
		rep.Notes = append(rep.Notes, part.Notes...)
	}
	return nil
}
