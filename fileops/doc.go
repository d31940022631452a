// Package fileops is overclone's userspace overlay engine: it reads a stack
// of layer directories the way the kernel's overlayfs would show them when
// mounted, and writes into the stack's upper layer the way the kernel's
// copy-up does — without mounting anything.
//
// The snapshotter uses it where a mount is impossible or too costly: to
// resolve and copy files out of unmounted snapshots, to copy up before a
// range operation, and to flatten deep stacks into a single layer.
//
// Two promises hold everywhere:
//
//   - Every path is resolved beneath its layer root with openat2
//     RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS and per-component lookups, so a
//     symlink inside a layer never leads outside it and ".." never climbs
//     out. A path with a NUL byte is an error.
//   - An entry fileops creates is changed (owner, xattrs, mode, times)
//     only through the descriptor it was opened as right after the create,
//     never by its name again, and a staged entry is renamed into place only
//     while its name still holds that inode: the upper, and a CopyOut
//     destination, may be directories another process writes and swaps
//     names in.
//   - The source of a data operation is always the topmost visible version
//     of a file, never a stale lower copy, and a destination that exists only
//     in a lower layer is copied up before it is written.
//
// The package never mounts, never talks to containerd and never changes a
// lower layer.
//
// # Where fileops and the kernel differ, on purpose
//
//   - Resolve, ReadDir, CopyUp and the range operations follow no symlink,
//     not even in the middle: a merged path whose component is a symlink
//     gives ENOTDIR where a process on the mount would follow it.
//     ResolveFollow, CopyOut and CopyIn follow links in the merged view as
//     a process chrooted at the merged root would (absolute targets from
//     that root, ".." clamped there and taken after the link, ELOOP past
//     40 links); a link's text is walked through the layers like any other
//     path, so it never leads out of them. CopyOut keeps a last link as a
//     link (cp -P); CopyIn writes through it (cp, docker cp).
//   - Xattr whiteouts (overlay.whiteout on an empty file): the kernel's
//     lookup hides the name everywhere, but its readdir still lists it in
//     the upper, in a dir not marked opaque=x and in the bottom layer
//     (measured on 6.18). fileops hides it from Resolve and ReadDir alike.
//   - Hard links inside one lower layer stay links when copied up (the
//     kernel needs index=on for that). fileops remembers them per Stack,
//     in memory.
//   - fileops writes no overlay bookkeeping (origin, impure, index) into the
//     upper and never creates metacopy files; it reads metacopy files the
//     kernel made and completes them on CopyUp.
//   - Range operations always copy the destination up, dedupe included;
//     the kernel refuses dedupe (EPERM) unless both files are upper.
//   - A user's escaped "trusted.overlay.overlay.X" xattr is copied as it is
//     stored, not unescaped as the kernel shows it through a mount.
//   - ReadDir lists a name whose lookup fails (an invalid or refused
//     redirect, a metacopy file without data) with Entry.Err set, as the
//     kernel's readdir lists it and only its stat fails. Flatten and
//     CopyOut then stop with an error naming it, where cp -a on the mount
//     would report it and copy the rest: a flattened layer must not lack
//     an entry without its caller knowing.
//   - Regular files appear in the upper through O_TMPFILE and linkat. Other
//     entries are built under a ".overclone-tmp-PID-N" name, in the work
//     dir when WithWorkDir is given, else next to their final name; a crash
//     in between can leave such a name behind. The kernel shows it; fileops
//     hides that exact form in every layer (an upper with a leftover may
//     since have been committed into a lower), refuses to write it, and
//     Stack.CleanStaging removes the leftovers whose writer is gone.
package fileops
