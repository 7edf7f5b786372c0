"""The token store: a corpus tokenized once, as shards of token ids that training memory-maps.

    STORE/manifest.json   what the store holds: tokenizer fingerprint, vocabulary size, dtype, counts,
                          the sources (size and mtime) and options it was prepared from, the shards
    STORE/tokenizer/      the tokenizer it was prepared with (a run on the store may use it)
    STORE/NNNNN.tokens    token ids, uint16 when the vocabulary fits, else uint32; each document followed
                          by <|endoftext|>, so the shards read in order are one token stream
    STORE/NNNNN.docs      uint64: where each document ends within the shard (its end-of-text + 1)
    STORE/NNNNN.crc       uint32: the CRC-32 of every 64 KiB of the .tokens file
    STORE/eval/           the held-out data given with --eval-data, a store of its own

Reading checks every shard's size against the manifest when the store is opened (a truncated shard is
found at once) and each 64 KiB block's CRC the first time a row touches it, so a corrupted shard is an error
naming it, never silent garbage, at a cost that grows with the rows read, not with the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

FORMAT = "llm-scratch-token-store"
VERSION = 1
MANIFEST = "manifest.json"
CRC_BYTES = 1 << 16


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
    """Appends tokenized blocks to the current shard; `finish()` closes it (temporary names, then renamed)."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, index: int):
        self.out, self.dtype, self.shard_tokens, self.index = out, dtype, shard_tokens, index
        self.file = None

    def _name(self) -> str:
        return f"{self.index:05d}"

    def add(self, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
        if self.file is None:
            self.file = open(self.out / f"{self._name()}.tokens.tmp", "wb")
            self.tokens, self.doc_ends = 0, []
        self.file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.doc_ends.append(self.tokens + np.cumsum(doc_lens, dtype=np.uint64))
        self.tokens += len(tokens)

    def full(self) -> bool:
        return self.file is not None and self.tokens >= self.shard_tokens

    def finish(self) -> dict | None:
        """The shard's manifest entry (None when nothing was added since the last one)."""
        if self.file is None:
            return None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        name = self._name()
        tmp = self.out / f"{name}.tokens.tmp"
        crcs = []
        with open(tmp, "rb") as f:
            while block := f.read(CRC_BYTES):
                crcs.append(zlib.crc32(block))
        crc = np.asarray(crcs, dtype=np.uint32)
        docs = np.concatenate(self.doc_ends) if self.doc_ends else np.zeros(0, np.uint64)
        atomic_write_bytes(self.out / f"{name}.docs", docs.astype(np.uint64).tobytes())
        atomic_write_bytes(self.out / f"{name}.crc", crc.tobytes())
        os.replace(tmp, self.out / f"{name}.tokens")
        self.index += 1
        digest = hashlib.blake2b(crc.tobytes(), digest_size=8).hexdigest()
        return {"name": name, "tokens": int(self.tokens), "docs": int(len(docs)), "crc": digest}


class _Shard:
    def __init__(self, root: Path, entry: dict, dtype: np.dtype):
        self.name, self.n = entry["name"], int(entry["tokens"])
        self.path = root / f"{self.name}.tokens"
        nbytes = self.n * dtype.itemsize
        for suffix, want in ((".tokens", nbytes), (".crc", 4 * -(-nbytes // CRC_BYTES))):
            p = root / f"{self.name}{suffix}"
            if not p.is_file():
                raise DataError(f"{p}: missing from the store; prepare it again")
            if p.stat().st_size != want:
                raise DataError(
                    f"{p}: {p.stat().st_size} bytes where the manifest says {want} (truncated or replaced); "
                    "prepare the store again"
                )
        self.crc = np.fromfile(root / f"{self.name}.crc", dtype=np.uint32)
        if hashlib.blake2b(self.crc.tobytes(), digest_size=8).hexdigest() != entry["crc"]:
            raise DataError(f"{root / self.name}.crc: does not match the manifest; prepare the store again")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r", shape=(self.n,)) if self.n else np.zeros(0, dtype)
        self.checked = np.zeros(len(self.crc), dtype=bool)

    def read(self, a: int, b: int) -> np.ndarray:
        itemsize = self.tokens.dtype.itemsize
        k0, k1 = a * itemsize // CRC_BYTES, -(-b * itemsize // CRC_BYTES)
        for k in np.flatnonzero(~self.checked[k0:k1]) + k0:
            lo, hi = k * CRC_BYTES // itemsize, min(self.n, (k + 1) * CRC_BYTES // itemsize)
            if zlib.crc32(self.tokens[lo:hi].tobytes()) != self.crc[k]:
                raise DataError(
                    f"{self.path}: corrupted (bytes {k * CRC_BYTES}-{k * CRC_BYTES + CRC_BYTES - 1} do not match "
                    "their checksum); prepare the store again"
                )
            self.checked[k] = True
        return self.tokens[a:b]


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
        self.shards = [_Shard(self.path, e, self.dtype) for e in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + [s.n for s in self.shards])

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

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the stream (across shards when the range spans them)."""
        i = int(np.searchsorted(self.offsets, a, side="right")) - 1
        parts = []
        while a < b and i < len(self.shards):
            lo = int(self.offsets[i])
            take = min(b, int(self.offsets[i + 1]))
            parts.append(self.shards[i].read(a - lo, take - lo))
            a, i = take, i + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def document_ends(self) -> np.ndarray:
        """Where every document ends in the stream (reads every .docs file: tools and tests, not training)."""
        ends = [
            np.fromfile(self.path / f"{s.name}.docs", dtype=np.uint64) + np.uint64(lo)
            for s, lo in zip(self.shards, self.offsets)
        ]
        return np.concatenate(ends) if ends else np.zeros(0, np.uint64)


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
