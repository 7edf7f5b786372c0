"""SFT and DPO data at scale: conversations and pairs rendered and tokenized once, by prepare's worker
processes, into a store (train/data/store.py) that the stages read example by example.

- An SFT store holds each conversation's ids with its loss mask (train/data/chat_masks.py), and per
  conversation its first trained position and its number of trained targets, so the truncation policy
  (train/data/finetune.py: keep the beginning, drop a conversation with nothing to learn within the row) is
  applied at read time without reading the conversations.
- A DPO store holds each pair as three documents: prompt (rendered with the generation prompt), chosen and
  rejected completion (each with <|im_end|>); a pair whose prompt leaves no room is dropped, completions cut.

`StoredSFTExamples` and `StoredDPOExamples` are sequences of the same SFTExample / DPOExample the in-memory
path builds, so SFTDataset, PackedSFTDataset and DPODataset read them alike; memory holds a few integers
per example (which ones are kept), never the examples. A VLM's data (images) is read in memory as before.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .batches import fingerprint
from .finetune import DPOExample, SFTExample, encode_dpo, encode_sft
from .formats import dpo_record, sft_record
from .sources import Block, RecordError, block_records

WHERE = "\x00"  # a worker does not know the record's line; the main process puts FILE:LINE in its place


def encode_records_block(block: Block, kind: str, tokenizer) -> dict:
    """A block of SFT conversations or DPO pairs as token ids (and for SFT, masks and per-example figures)."""
    recs, n_records = block_records(block)
    ids_parts, lens, masks, first, trained = [], [], [], [], []
    for i, rec in recs:
        try:
            if kind == "sft":
                conv = sft_record(rec, block.path, WHERE)
                if conv.images:
                    raise DataError(f"{WHERE}: the record has images but the model is not a VLM")
                ids, mask = encode_sft(tokenizer, conv.messages)
                m = np.asarray(mask, dtype=bool)
                hits = np.flatnonzero(m[1:])
                first.append(hits[0] + 1 if len(hits) else len(ids))
                trained.append(len(hits))
                masks.append(m)
                ids_parts.append(ids)
                lens.append(len(ids))
            else:
                pair = dpo_record(rec, block.path, WHERE)
                if pair.images:
                    raise DataError(f"{WHERE}: the record has images but the model is not a VLM")
                for part in encode_dpo(tokenizer, pair):
                    ids_parts.append(part)
                    lens.append(len(part))
        except DataError as e:
            raise RecordError(i, str(e).removeprefix(f"{WHERE}: ")) from None
    tokens = np.fromiter((t for part in ids_parts for t in part), dtype=np.uint32, count=sum(lens))
    out = {"tokens": tokens, "doc_lens": np.asarray(lens, dtype=np.int64), "records": n_records, "bytes": 0}
    if block.kind == "jsonl":
        out["bytes"] = block.stop - block.start
    if kind == "sft":
        out["extra"] = {
            "mask": np.concatenate(masks) if masks else np.zeros(0, bool),
            "first": np.asarray(first, dtype=np.int32),
            "trained": np.asarray(trained, dtype=np.int32),
        }
    return out


def _starts_ends(store, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    ends = store.read_docs(a, b).astype(np.int64)
    before = store.read_docs(a - 1, a).astype(np.int64) if a > 0 else np.zeros(1, np.int64)
    return np.concatenate([before, ends[:-1]]), ends


class _StoredExamples:
    """Examples [lo, hi) of a store of this `kind` that fit max_len + 1 tokens (`keeps`); the others are
    counted in `dropped`. Holds only the indices of the kept ones."""

    kind = ""
    docs_per_example = 1

    def __init__(self, store, max_len: int, lo: int = 0, hi: int | None = None):
        if store.kind != self.kind:
            raise DataError(f"{store.path}: a {store.kind} store, not a {self.kind} store")
        hi = store.num_docs // self.docs_per_example if hi is None else hi
        self.store, self.max_len, self.lo, self.hi = store, max_len, lo, hi
        self.index = lo + np.flatnonzero(self.keeps())
        self.dropped = (hi - lo) - len(self.index)

    def keeps(self) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.index)

    def fingerprint(self) -> str:
        return fingerprint(self.store.fingerprint(), self.kind, self.max_len, self.lo, self.hi)


class StoredSFTExamples(_StoredExamples):
    """Conversations [lo, hi) of an SFT store, truncated to max_len + 1 tokens, without those that would
    train on nothing (their count is `dropped`)."""

    kind = "sft"

    def keeps(self) -> np.ndarray:
        return np.asarray(self.store.read_docs(self.lo, self.hi, "first")) <= self.max_len

    def span(self, k: int) -> tuple[int, int]:
        j = int(self.index[k])
        starts, ends = _starts_ends(self.store, j, j + 1)
        return int(starts[0]), min(int(ends[0]), int(starts[0]) + self.max_len + 1)

    def lengths(self) -> np.ndarray:
        """Every kept conversation's length after truncation (read from the document ends only)."""
        starts, ends = _starts_ends(self.store, self.lo, self.hi)
        return np.minimum(ends - starts, self.max_len + 1)[self.index - self.lo]

    def trained_tokens(self) -> int:
        """Targets trained on, over the kept conversations (truncated ones are read to count theirs)."""
        starts, ends = _starts_ends(self.store, self.lo, self.hi)
        trained = np.asarray(self.store.read_docs(self.lo, self.hi, "trained"), dtype=np.int64)
        long = np.flatnonzero(ends - starts > self.max_len + 1)
        total = int(trained[self.index - self.lo].sum())
        for k in np.intersect1d(long + self.lo, self.index):  # cut: count what is left of them
            s = int(starts[k - self.lo])
            total -= int(trained[k - self.lo]) - int(self.store.read(s + 1, s + self.max_len + 1, "mask").sum())
        return total

    def __getitem__(self, k: int) -> SFTExample:
        a, b = self.span(k)
        return SFTExample(
            np.asarray(self.store.read(a, b), dtype=np.int32), np.asarray(self.store.read(a, b, "mask"), dtype=bool)
        )


class StoredDPOExamples(_StoredExamples):
    """Pairs [lo, hi) of a DPO store; a pair whose prompt leaves no room within max_len + 1 tokens is left
    out (`dropped`), completions are cut to the room left."""

    kind = "dpo"
    docs_per_example = 3  # prompt, chosen, rejected

    def keeps(self) -> np.ndarray:
        starts, ends = _starts_ends(self.store, 3 * self.lo, 3 * self.hi)
        return (ends - starts)[0::3] <= self.max_len  # the prompt leaves room for a completion token

    def __getitem__(self, k: int) -> DPOExample:
        j = int(self.index[k])
        starts, ends = _starts_ends(self.store, 3 * j, 3 * j + 3)
        p = np.asarray(self.store.read(int(starts[0]), int(ends[0])), dtype=np.int32)
        room = self.max_len + 1 - len(p)
        c, r = (
            np.asarray(self.store.read(int(starts[i]), min(int(ends[i]), int(starts[i]) + room)), dtype=np.int32)
            for i in (1, 2)
        )
        return DPOExample(p, c, r)
