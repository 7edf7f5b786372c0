"""Batches: the seeded, resumable order of a dataset's rows, shared out across data-parallel ranks, and
the default collation."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..errors import UserError


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class BatchOrder:
    """Seeded shuffled order over a dataset's rows, epoch after epoch, with a saveable position.

    Each global batch of `batch_size * world_size` rows is split so rank r takes its own slice, so
    data-parallel ranks never see the same row in a step and the global batch equals a 1-rank run's.
    """

    def __init__(
        self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
        global_batch = batch_size * world_size
        if num_rows < global_batch:
            raise UserError(
                f"the data gives {num_rows} rows but one global batch needs {global_batch}: "
                "add data, or lower --batch-size or --seq-len"
            )
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        return perm.astype(np.uint32) if self.num_rows < 1 << 32 else perm  # half the memory, the same order

    def next_indices(self) -> list[int]:
        global_batch = self.batch_size * self.world_size
        if self.cursor + global_batch > self.num_rows:  # drop the ragged tail, start a new epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.cursor : self.cursor + global_batch]
        self.cursor += global_batch
        start = self.rank * self.batch_size
        return idx[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise UserError(
                f"cannot resume: the checkpoint's data had {state['num_rows']} rows (seed {state['seed']}), "
                f"this run's has {self.num_rows} (seed {self.seed}); resume with the same data and seed"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation()


def fingerprint(*parts) -> str:
    """A short hash of a dataset's content (arrays, strings, numbers, nested lists of them), so a resumed
    run can tell that it is given the same data (the same size is not enough)."""
    h = hashlib.blake2b(digest_size=12)

    def add(x) -> None:
        if isinstance(x, np.ndarray):
            h.update(str(x.dtype).encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, (list, tuple)):
            h.update(b"[%d" % len(x))
            for y in x:
                add(y)
        else:
            h.update(repr(x).encode())
        h.update(b";")

    add(list(parts))
    return h.hexdigest()
