"""Pretraining rows: documents joined by <|endoftext|> into one token stream, cut into fixed-length rows
whose document masks keep the documents apart."""

from __future__ import annotations

import numpy as np
import torch

from .batches import fingerprint
from .store import ArrayStream


def tokenize_documents(texts: list[str], tokenizer, eot_id: int) -> np.ndarray:
    """One token stream: each document followed by <|endoftext|> (in memory: tests and small tools; training
    reads a token store, train/data/prepare.py)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    total = sum(len(x) + 1 for x in ids)
    out = np.empty(total, dtype=np.int32)
    pos = 0
    for x in ids:
        out[pos : pos + len(x)] = x
        out[pos + len(x)] = eot_id
        pos += len(x) + 1
    return out


class PackedDataset:
    """Fixed-length rows cut from a token stream (a TokenStore, or an array): row i covers
    stream[i*T : i*T + T + 1], so every token is a target exactly once. `rows` = (first, stop) keeps a range
    of them (the training part, the held-out tail). With `document_mask` (default), each row also carries
    segment ids (documents cannot attend to each other) and position ids that restart at each document.
    """

    def __init__(self, stream, seq_len: int, eot_id: int, document_mask: bool = True, rows=None):
        self.stream = ArrayStream(stream) if isinstance(stream, np.ndarray) else stream
        self.seq_len, self.eot_id, self.document_mask = seq_len, eot_id, document_mask
        self.first, self.stop = rows if rows is not None else (0, total_rows(self.stream, seq_len))

    def fingerprint(self) -> str:
        parts = (self.stream.fingerprint(), self.seq_len, self.eot_id, self.document_mask, self.first, self.stop)
        return fingerprint(*parts)

    def __len__(self) -> int:
        return max(0, self.stop - self.first)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        t, j = self.seq_len, self.first + i
        chunk = torch.from_numpy(self.stream.read(j * t, j * t + t + 1).astype(np.int64))
        inputs, targets = chunk[:-1], chunk[1:]
        row = {"input_ids": inputs, "targets": targets}
        if self.document_mask:
            row["segment_ids"], row["position_ids"] = segments_and_positions(inputs, self.eot_id)
        return row


def total_rows(stream, seq_len: int) -> int:
    return max(0, (len(stream) - 1) // seq_len)


class MixedRows:
    """Several row sets as one, each taking its weight's share of the rows (deterministic, O(1) memory).

    The mixture has as many rows as its parts together; part k owns n_k = weight_k * total of them, a block
    of indices that the batch order's shuffle spreads over the batches. Index j of part k reads its row
    j * len_k // n_k when the part has enough rows (an even subset), else row j % len_k (repeated). Without
    weights every part keeps its own rows (a concatenation).
    """

    def __init__(self, parts: list, weights: list[float] | None = None):
        self.parts = parts
        lens = [len(p) for p in parts]
        if weights is None:
            self.counts = lens
        else:
            total, wsum = sum(lens), sum(weights)
            self.counts = [max(1, round(total * w / wsum)) for w in weights]
        self.lens = lens
        self.bounds = np.cumsum([0] + self.counts)

    def fingerprint(self) -> str:
        return fingerprint([p.fingerprint() for p in self.parts], self.counts)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def source_of(self, i: int) -> int:
        return int(np.searchsorted(self.bounds, i, side="right")) - 1

    def __getitem__(self, i: int):
        k = self.source_of(i)
        j, n, length = i - int(self.bounds[k]), self.counts[k], self.lens[k]
        return self.parts[k][j * length // n if n <= length else j % length]


def segments_and_positions(inputs: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A new document starts after every <|endoftext|>; positions count from 0 within each."""
    is_eot = (inputs == eot_id).long()
    seg = torch.cumsum(is_eot, 0) - is_eot  # the eot belongs to the document it ends
    idx = torch.arange(len(inputs))
    starts = torch.zeros_like(idx)
    boundary = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
    starts[boundary] = boundary
    starts = torch.cummax(starts, 0).values
    return seg, idx - starts
