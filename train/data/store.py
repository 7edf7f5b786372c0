"""The token store: a corpus tokenized once, as shards of token ids that training memory-maps.

    STORE/manifest.json   what the store holds: tokenizer fingerprint, vocabulary size, dtype, counts,
                          the sources (size and mtime) and options it was prepared from, the shards
    STORE/tokenizer/      the tokenizer it was prepared with (a run on the store may use it)
    STORE/NNNNN.tokens    token ids, uint16 when the vocabulary fits, else uint32; in a pretraining store
                          each document is followed by <|endoftext|>, so the shards in order are one stream
    STORE/NNNNN.docs      uint64: where each document ends within the shard (its end-of-text + 1)
    STORE/NNNNN.mask      (SFT stores) uint8 per token: 1 when the token is trained on
    STORE/NNNNN.first     (SFT stores) int32 per conversation: its first trained position after position 0
    STORE/NNNNN.trained   (SFT stores) int32 per conversation: how many of its tokens after the first are trained
    STORE/NNNNN.*.crc     uint32: the CRC-32 of every 4 KiB of the file it follows
    STORE/eval/           the held-out data given with --eval-data, a store of its own

A DPO store holds each pair as three documents: the rendered prompt, the chosen and the rejected completion.

Reading checks every shard's size against the manifest when the store is opened (a truncated shard is
found at once) and, on every read, the CRC of each 4 KiB page the read touches, so a corrupted shard is an
error naming it, never silent garbage, at a cost that grows with the rows read, not with the store.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

FORMAT = "llm-scratch-token-store"
VERSION = 1
MANIFEST = "manifest.json"
CRC_BYTES = 1 << 12  # one checksum per 4 KiB page: a row's read checks the page or two it touches


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def content_hash(dtype: str, eot_id: int, shards: list[dict]) -> str:
    """What a run's data fingerprint is made of: the shards' sizes and checksums, not their bytes again."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([dtype, eot_id, [[s["name"], s["tokens"], s["docs"], s["crc"]] for s in shards]]).encode())
    return h.hexdigest()


def is_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class ShardWriter:
    """Appends tokenized blocks to the current shard; `finish()` closes it (temporary names, then renamed).

    Every shard has `tokens` and `docs` (each document's end); an SFT store adds `mask` per token (in the loss),
    and per conversation `first` (its first trained position after the first token) and `trained` (how many
    of its targets are trained on). Each file has a `.crc` beside it."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, index: int):
        self.out, self.dtype, self.shard_tokens, self.index = out, dtype, shard_tokens, index
        self.files: dict | None = None

    def _name(self) -> str:
        return f"{self.index:05d}"

    def add(self, tokens: np.ndarray, doc_lens: np.ndarray, **extra: np.ndarray) -> None:
        """`extra`: the SFT columns (mask per token; first and trained per document)."""
        if self.files is None:
            self.files, self.tokens, self.docs = {}, 0, 0
        columns = {"tokens": tokens.astype(self.dtype, copy=False)}
        columns["docs"] = np.uint64(self.tokens) + np.cumsum(doc_lens, dtype=np.uint64)
        columns.update({k: v.astype(COLUMN_DTYPES[k], copy=False) for k, v in extra.items()})
        for col, arr in columns.items():
            if col not in self.files:
                self.files[col] = open(self.out / f"{self._name()}.{col}.tmp", "wb")
            self.files[col].write(arr.tobytes())
        self.tokens += len(tokens)
        self.docs += len(doc_lens)

    def full(self) -> bool:
        return self.files is not None and self.tokens >= self.shard_tokens

    def finish(self) -> dict | None:
        """The shard's manifest entry (None when nothing was added since the last one)."""
        if self.files is None:
            return None
        name, digest = self._name(), hashlib.blake2b(digest_size=8)
        for col, f in sorted(self.files.items()):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            tmp = self.out / f"{name}.{col}.tmp"
            crcs = []
            with open(tmp, "rb") as g:
                while block := g.read(CRC_BYTES):
                    crcs.append(zlib.crc32(block))
            crc = np.asarray(crcs, dtype=np.uint32)
            atomic_write_bytes(self.out / f"{name}.{col}.crc", crc.tobytes())
            os.replace(tmp, self.out / f"{name}.{col}")
            digest.update(col.encode() + crc.tobytes())
        entry = {"name": name, "tokens": int(self.tokens), "docs": int(self.docs), "crc": digest.hexdigest()}
        self.index += 1
        self.files = None
        return entry


COLUMN_DTYPES = {
    "docs": np.dtype(np.uint64),
    "mask": np.dtype(np.uint8),
    "first": np.dtype(np.int32),
    "trained": np.dtype(np.int32),
}
SFT_COLUMNS = ["tokens", "docs", "mask", "first", "trained"]


def _map(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    """A read-only memory map of the file, told that reads are random (no read-ahead: only the pages rows
    touch become resident)."""
    if n == 0:
        return np.zeros(0, dtype)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(m, "madvise"):
        m.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(m, dtype=dtype, count=n)


class _Column:
    """One memory-mapped file of a shard. Its size (and its checksum file's) is checked when the store is
    opened; every read checks the CRC of each `crc_bytes` block it touches, so corruption is never read as
    data, at a cost that grows with the rows read, never with the store."""

    def __init__(self, path: Path, dtype: np.dtype, n: int, crc_bytes: int):
        self.path, self.n, self.crc_bytes = path, n, crc_bytes
        nbytes = n * dtype.itemsize
        crc_path = path.with_name(path.name + ".crc")
        for p, want in ((path, nbytes), (crc_path, 4 * -(-nbytes // crc_bytes))):
            if not p.is_file():
                raise DataError(f"{p}: missing from the store; prepare it again")
            if p.stat().st_size != want:
                raise DataError(
                    f"{p}: {p.stat().st_size} bytes where the manifest says {want} (truncated or replaced); "
                    "prepare the store again"
                )
        self.data = _map(path, dtype, n)
        self.crc = _map(crc_path, np.dtype(np.uint32), -(-nbytes // crc_bytes))

    def read(self, a: int, b: int) -> np.ndarray:
        size, per = self.data.dtype.itemsize, self.crc_bytes // self.data.dtype.itemsize
        raw = memoryview(self.data).cast("B")
        for k in range(a // per, -(-b // per)):
            lo, hi = k * self.crc_bytes, min(self.n * size, (k + 1) * self.crc_bytes)
            if zlib.crc32(raw[lo:hi]) != self.crc[k]:
                raise DataError(
                    f"{self.path}: corrupted (bytes {lo}-{hi - 1} do not match their checksum); prepare the store again"
                )
        return self.data[a:b]


class _Shard:
    def __init__(self, root: Path, entry: dict, dtype: np.dtype, columns: list[str], crc_bytes: int):
        self.name, self.n, self.n_docs = entry["name"], int(entry["tokens"]), int(entry["docs"])
        self.cols = {
            col: _Column(
                root / f"{self.name}.{col}",
                COLUMN_DTYPES.get(col, dtype),
                self.n if col in ("tokens", "mask") else self.n_docs,
                crc_bytes,
            )
            for col in columns
        }

    def read(self, a: int, b: int, col: str = "tokens") -> np.ndarray:
        return self.cols[col].read(a, b)


class TokenStore:
    """A prepared store, opened for reading: one token stream over all shards, memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        m = self.path / MANIFEST
        if not m.is_file():
            raise DataError(f"{self.path}: not a token store (no {MANIFEST}); make one with `llm-scratch prepare`")
        try:
            self.manifest = json.loads(m.read_text())
            ok = self.manifest["format"] == FORMAT
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise DataError(f"{m}: not a token store manifest")
        if self.manifest["version"] != VERSION:
            raise DataError(f"{m}: store format version {self.manifest['version']}, this program reads {VERSION}")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eot_id = int(self.manifest["eot_id"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.tokenizer_fingerprint = self.manifest["tokenizer_fingerprint"]
        self.kind = self.manifest.get("kind", "text")
        self.columns = SFT_COLUMNS if self.kind == "sft" else ["tokens", "docs"]
        crc_bytes = int(self.manifest.get("crc_bytes", 1 << 16))  # stores written before 4 KiB pages: 64 KiB
        self.shards = [_Shard(self.path, e, self.dtype, self.columns, crc_bytes) for e in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + [s.n for s in self.shards])
        self.doc_offsets = np.cumsum([0] + [s.n_docs for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def fingerprint(self) -> str:
        return self.manifest["content_hash"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def eval_fraction(self) -> float | None:
        return self.manifest.get("eval_fraction")

    def eval_store(self) -> TokenStore | None:
        return TokenStore(self.path / "eval") if is_store(self.path / "eval") else None

    def read(self, a: int, b: int, col: str = "tokens") -> np.ndarray:
        """Tokens (or another per-token column) [a, b) of the stream, across shards when the range spans them."""
        return self._read(self.offsets, a, b, col)

    def read_docs(self, a: int, b: int, col: str = "docs") -> np.ndarray:
        """A per-document column for documents [a, b); `docs` gives their ends in the whole stream."""
        out = self._read(self.doc_offsets, a, b, col)
        if col == "docs":
            shard = np.searchsorted(self.doc_offsets, np.arange(a, b), side="right") - 1
            out = out.astype(np.int64) + self.offsets[shard]
        return out

    def _read(self, offsets: np.ndarray, a: int, b: int, col: str) -> np.ndarray:
        i = int(np.searchsorted(offsets, a, side="right")) - 1
        parts = []
        while a < b and i < len(self.shards):
            lo = int(offsets[i])
            take = min(b, int(offsets[i + 1]))
            parts.append(self.shards[i].read(a - lo, take - lo, col))
            a, i = take, i + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, COLUMN_DTYPES.get(col, self.dtype))

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets[-1])

    def document_ends(self) -> np.ndarray:
        """Where every document ends in the stream (tools and tests; training reads the documents it needs)."""
        return self.read_docs(0, self.num_docs)


class ArrayStream:
    """A token stream held in memory, with the store's reading interface (tests and small tools)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, a: int, b: int) -> np.ndarray:
        return self.tokens[a:b]

    def fingerprint(self) -> str:
        from .batches import fingerprint

        return fingerprint(self.tokens)
