"""Pretraining rows: documents joined by <|endoftext|> into one token stream, cut into fixed-length rows
whose document masks keep the documents apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .batches import fingerprint
from .formats import iter_pretrain_texts


def tokenize_documents(texts: list[str], tokenizer, eot_id: int) -> np.ndarray:
    """One token stream: each document followed by <|endoftext|>."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    total = sum(len(x) + 1 for x in ids)
    out = np.empty(total, dtype=np.int32)
    pos = 0
    for x in ids:
        out[pos : pos + len(x)] = x
        out[pos + len(x)] = eot_id
        pos += len(x) + 1
    return out


def load_token_stream(paths: list[str | Path], tokenizer, eot_id: int) -> np.ndarray:
    texts = [t for p in paths for t in iter_pretrain_texts(p)]
    return tokenize_documents(texts, tokenizer, eot_id)


class PackedDataset:
    """Fixed-length rows cut from a token stream: row i covers stream[i*T : i*T + T + 1], so every
    token is a target exactly once. With `document_mask` (default), each row also carries segment
    ids (documents cannot attend to each other) and position ids that restart at each document.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, eot_id: int, document_mask: bool = True):
        self.stream, self.seq_len, self.eot_id, self.document_mask = stream, seq_len, eot_id, document_mask
        self.num_rows = max(0, (len(stream) - 1) // seq_len)

    def fingerprint(self) -> str:
        return fingerprint(self.stream, self.seq_len, self.eot_id, self.document_mask)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.seq_len
        chunk = torch.from_numpy(self.stream[i * t : i * t + t + 1].astype(np.int64))
        inputs, targets = chunk[:-1], chunk[1:]
        row = {"input_ids": inputs, "targets": targets}
        if self.document_mask:
            row["segment_ids"], row["position_ids"] = segments_and_positions(inputs, self.eot_id)
        return row


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
