package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
)

// Check answers whether the snapshotter can serve: the metadata database
// is open and readable, and the root takes a new file. A probe that only
// checked that the process is alive would keep a node whose disk went
// read-only (xfs shut down after an I/O error, ext4 remounted ro) in
// service, failing every Prepare.
func (s *Snapshotter) Check(ctx context.Context) error {
	s.closeMu.Lock()
	closed := s.closed
	s.closeMu.Unlock()
	if closed {
		return errors.New("snapshotter is closed")
	}
	if err := s.ms.WithTransaction(ctx, false, func(context.Context) error { return nil }); err != nil {
		return fmt.Errorf("read metadata: %w", err)
	}
	f, err := os.CreateTemp(s.root, ".healthz-")
	if err != nil {
		return fmt.Errorf("root %s is not writable: %w", s.root, err)
	}
	name := f.Name()
	_, werr := f.Write([]byte("ok"))
	cerr := f.Close()
	rerr := os.Remove(name)
	if err := errors.Join(werr, cerr, rerr); err != nil {
		return fmt.Errorf("root %s is not writable: %w", s.root, err)
	}
	return nil
}

// DBPath is the metadata database's file.
func (s *Snapshotter) DBPath() string { return dbPath(s.root) }

func dbPath(root string) string { return root + "/metadata.db" }
