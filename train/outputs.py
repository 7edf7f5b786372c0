"""The rules for directories the commands write into: nothing of the user's is deleted or overwritten, a
run directory belongs to one run at a time, and nothing is written through a symbolic link.

- A training run (`RunLock`, used by train/run_dir.py) takes a new or empty directory, or its own: one
  holding an earlier run of this program (a `run.lock` file is there), which it continues with --resume
  or, when that run never saved a checkpoint, starts again. While it runs it holds an exclusive lock on
  `run.lock` (an OS file lock: a run that dies releases it, so a stale lock is taken over) with its pid
  inside; a second run on the same directory is refused, naming that pid.
- A directory several commands fill (the demo's output, `llm-scratch data`) keeps a manifest of the files
  this program wrote there (`OwnedFiles`); it overwrites or removes only those, and refuses anything else
  in its way, naming it.
- A command writing one artefact (vlm-init, the tokenizer) takes a new or empty directory, or one holding
  only its own kind of files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError

LOCK_FILE = "run.lock"


def no_symlinks(directory: Path, names: Iterable[str]) -> None:
    """A run never writes through a link: refuse one where it would write."""
    for name in names:
        p = directory / name
        if p.is_symlink():
            raise UserError(f"{p} is a symbolic link; refusing to write through it (remove it or choose another --out)")


def is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


class RunLock:
    """Claims OUT for one training run (see the module docstring); `release()` when the run ends."""

    def __init__(self, out: Path, resume: bool, writes: Iterable[str], take_lock: bool = True):
        self.out, self.fd, self.created = out, None, False
        if out.is_symlink() and not out.is_dir():
            raise UserError(f"{out} is a symbolic link to a file; --out must be a directory")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory")
        ours = (out / LOCK_FILE).exists() or (out / "latest").exists()  # runs from before the lock have `latest`
        if out.exists() and not is_empty_dir(out) and not ours:
            raise UserError(
                f"{out} is not empty and holds no run of this program; choose a new or empty --out "
                "(a run never writes into a directory of other files)"
            )
        no_symlinks(out, [LOCK_FILE, *writes])
        if take_lock:
            self._lock()

    def _lock(self) -> None:
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{self.out} is in use by another run (pid {holder}); wait for it or choose another --out"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self, failed: bool = False) -> None:
        """Drop the lock (the file stays as the mark of this run). A run that failed before writing
        anything leaves no trace: a directory it created holding only the lock file is removed."""
        if self.fd is None:
            return
        if failed and self.created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
            (self.out / LOCK_FILE).unlink()
            self.out.rmdir()
        os.close(self.fd)  # closing drops the lock
        self.fd = None


class OwnedFiles:
    """The files this program wrote in a directory, listed in a manifest inside it."""

    def __init__(self, directory: Path, manifest: str, what: str):
        self.dir, self.path, self.what = directory, directory / manifest, what
        self.files: set[str] = set()
        if self.path.exists():
            try:
                self.files = set(json.loads(self.path.read_text())["files"])
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{self.path}: not a readable manifest; remove it and the files it named") from None

    def owns(self, rel: str) -> bool:
        return rel in self.files

    def claim(self, rels: Iterable[str]) -> None:
        """Refuse if any of these paths (files, or directories and everything in them) exists and was not
        written here before; those that were are removed, ready to be written again."""
        for rel in rels:
            p = self.dir / rel
            if not p.exists() and not p.is_symlink():
                continue
            found = [p] if not p.is_dir() or p.is_symlink() else [q for q in p.rglob("*") if not q.is_dir()]
            foreign = [q for q in found if not self.owns(str(q.relative_to(self.dir)))]
            if foreign:
                raise UserError(
                    f"{foreign[0]}: in the way of {self.what} and not written by it; move it or choose another "
                    "directory (nothing is overwritten that this program did not write)"
                )
        for rel in rels:
            p = self.dir / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
            self.files = {f for f in self.files if f != rel and not f.startswith(rel + "/")}

    def wrote(self, rels: Iterable[str]) -> None:
        """Record the files under these paths (files or directories this program just wrote)."""
        for rel in rels:
            p = self.dir / rel
            found = [p] if p.is_file() else p.rglob("*") if p.is_dir() else []
            self.files |= {str(q.relative_to(self.dir)) for q in found if q.is_file() and not q.is_symlink()}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"files": sorted(self.files)}, indent=1) + "\n")
        os.replace(tmp, self.path)


def check_new_or_own(out: Path, own_names: Iterable[str], what: str) -> None:
    """`out` must be new, empty, or hold only files named in own_names (an earlier output of the same kind)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory")
    if out.is_dir():
        own = set(own_names)
        other = sorted(p.name for p in out.iterdir() if p.name not in own)
        if other:
            raise UserError(
                f"{out}: not empty ({other[0]} is there) and not an earlier {what}; choose a new or empty directory"
            )
        no_symlinks(out, own)
