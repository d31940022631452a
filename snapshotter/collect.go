package snapshotter

import "context"

// Collect is Cleanup that also waits until the trash it filled, and
// whatever was queued for deletion before, is deleted. It is for `overclone
// gc`, whose user asked for the space back; containerd's collector calls
// Cleanup, which must not make image removal wait for the disk.
func (s *Snapshotter) Collect(ctx context.Context) error {
	if err := s.Cleanup(ctx); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		s.deletions.wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		// The deletions go on; only this caller stops waiting.
		return ctx.Err()
	}
}
