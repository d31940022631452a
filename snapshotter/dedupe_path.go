package snapshotter

import (
	"context"
	"errors"
	"os"
	"slices"
	"sort"

	"github.com/containerd/log"
)

// shareByPath dedupes each of the layer's files that another committed
// layer holds at the same path with the same size against that copy,
// before any file is hashed, and returns their outcomes and the files
// left to hash.
//
// A rebuilt image's layer holds most files of the one it replaces, at the
// same paths. Hashing them only to find that copy read every byte once more
// (a third of what dedupe added to a Commit, measured), while
// FIDEDUPERANGE reads and compares both copies anyway: here the kernel's
// compare is the only read. A file it shares in full has the copy's
// content, so it is indexed under the copy's hash, unread; a file that
// differs (a changed file at the same path and size is no stale entry, only
// another content) or is shared in part is hashed and looked up as any
// other. An entry whose hash was wrong passes that on, and the kernel
// refuses it as it would refuse the entry (see contentHash).
func (s *Snapshotter) shareByPath(ctx context.Context, roots *rootCache, root *os.File, id string, files []hashedFile, rng sizeRange) ([]shareOutcome, []hashedFile, error) {
	cands, err := s.pathCandidates(ctx, id, files)
	if err != nil || len(cands) == 0 {
		return nil, files, err
	}
	var tried []int
	for i := range files {
		if len(cands[i]) > 0 {
			tried = append(tried, i)
		}
	}
	outcomes := make([]shareOutcome, len(files))
	const (
		unshared = iota
		done
		skip // not to be indexed after all
	)
	state := make([]int, len(files))
	parallel(tried, func(i int) {
		f := &files[i]
		file, ok, err := openIndexable(root, f, rng)
		if err != nil || !ok {
			if err != nil {
				outcomes[i].fatal = err // as hashFiles would
			}
			state[i] = skip
			return
		}
		defer file.Close()
		for _, c := range cands[i] {
			if c.Size != f.size {
				continue
			}
			shared, _, err := dedupeInto(ctx, roots, c, file, f.size)
			if errors.Is(err, errors.ErrUnsupported) || ctx.Err() != nil {
				outcomes[i].fatal = errors.Join(err, ctx.Err())
				state[i] = skip
				return
			}
			if err != nil {
				log.G(ctx).WithError(err).WithField("path", f.path).WithField("with", c.ID).Debug("dedupe with the copy at the same path skipped")
				continue
			}
			if shared == f.size {
				e := indexEntry{Hash: c.Hash, ID: id, Path: f.path, Size: f.size, Borrowed: f.blocks, Source: sourceOf(c)}
				outcomes[i] = shareOutcome{entry: e, shared: shared}
				state[i] = done
				return
			}
		}
	})
	var out []shareOutcome
	var rest []hashedFile
	for i, f := range files {
		if outcomes[i].fatal != nil {
			return nil, nil, outcomes[i].fatal
		}
		switch state[i] {
		case done:
			out = append(out, outcomes[i])
		case unshared:
			rest = append(rest, f)
		}
	}
	return out, rest, nil
}

// pathCandidates looks up, in one read transaction, the copies in other
// layers at each file's path with its size, sources first, at most
// maxCandidates; by index in files.
func (s *Snapshotter) pathCandidates(ctx context.Context, id string, files []hashedFile) (map[int][]indexEntry, error) {
	out := map[int][]indexEntry{}
	err := transact(ctx, s.ms, false, func(ctx context.Context) error {
		ix, err := openIndex(ctx, false)
		if err != nil {
			return err
		}
		for i, f := range files {
			hs, err := ix.atPath(f.path, f.size)
			if err != nil {
				return err
			}
			hs = slices.DeleteFunc(hs, func(e indexEntry) bool { return e.ID == id })
			if len(hs) == 0 {
				continue
			}
			sort.SliceStable(hs, func(i, j int) bool { return hs[i].Source == "" && hs[j].Source != "" })
			out[i] = hs[:min(len(hs), maxCandidates)]
		}
		return nil
	})
	return out, err
}
