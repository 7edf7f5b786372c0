"""`llm-scratch prepare`: a corpus -> a token store (train/data/store.py), in bounded memory.

The main process plans blocks (train/data/sources.py) and writes shards; worker processes read, check and
tokenize the blocks, and their results come back in block order, so the shards do not depend on the number
of workers. Memory holds a few blocks per worker and one shard's document ends, whatever the corpus size.

Resuming: after each shard is closed, `prepare.state.json` records the shards so far and the next block. A
prepare that was killed starts again from there when run again with the same inputs and options (the shards
come out byte-identical to an uninterrupted run); a prepare whose inputs, tokenizer and options match the
manifest has nothing to do.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from ..errors import DataError, UserError
from .sources import Block, RecordError, find_sources, plan_blocks, record_where, tokenize_block
from .store import (
    CRC_BYTES,
    FORMAT,
    MANIFEST,
    VERSION,
    ShardWriter,
    content_hash,
    is_store,
    token_dtype,
    write_json,
)

STATE = "prepare.state.json"
OWN = re.compile(
    r"^(\d{5}\.(tokens|docs|mask|first|trained)(\.crc)?|manifest\.json|prepare\.state\.json|tokenizer|eval)(\.tmp)?$"
)
KINDS = ("text", "sft", "dpo")
AUTO_WORKERS_BYTES = 32 << 20  # below this much input, tokenizing in this process beats starting workers

_worker: dict = {}


def _init_worker(tok_dir: str, eot_id: int, kind: str, vocab: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: --workers is the parallelism
    _worker.update(_encoder(Path(tok_dir), eot_id, kind, vocab))


def _encoder(tok_dir: Path, eot_id: int, kind: str, vocab: int) -> dict:
    """What turns a block into ids: the `tokenizers` object for text, transformers' (its chat template) for
    conversations."""
    if kind == "text":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    else:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir)
    return {"kind": kind, "tok": tok, "eot": eot_id, "vocab": vocab}


def _encode(block: Block, enc: dict):
    """The block's result, its ids already in the store's dtype (half the bytes back to the main process
    when they fit in uint16), or the RecordError that stops the prepare."""
    try:
        if enc["kind"] == "text":
            out = tokenize_block(block, enc["tok"], enc["eot"])
        else:
            from .finetune_store import encode_records_block

            out = encode_records_block(block, enc["kind"], enc["tok"])
    except RecordError as e:
        return e
    top = int(out["tokens"].max()) if len(out["tokens"]) else 0
    if top >= enc["vocab"]:
        return RecordError(0, f"the tokenizer gave id {top}, beyond its {enc['vocab']} tokens")
    out["tokens"] = out["tokens"].astype(token_dtype(enc["vocab"]))
    return out


def _work(block: Block):
    return _encode(block, _worker)


def check_out_dir(out: Path) -> None:
    """A store goes into a new or empty directory, or an earlier store (its own files only)."""
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link; refusing to write through it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if not OWN.match(p.name) or p.is_symlink())
        if other:
            raise UserError(
                f"{out}: not empty ({other[0]} is there) and not a token store; choose a new or empty --out"
            )


def _clear(out: Path) -> None:
    for p in out.iterdir():
        if p.name != "tokenizer" and OWN.match(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _progress(total: int, quiet: bool, title: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=title, disable=quiet, file=sys.stderr)


def prepare(
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    out: str | Path,
    workers: int | None = None,
    text_field: str = "text",
    eval_fraction: float | None = None,
    eval_data: list[str | Path] | None = None,
    block_bytes: int = 4 << 20,
    shard_bytes: int = 256 << 20,
    quiet: bool = False,
    progress: bool = True,
    kind: str = "text",
) -> dict:
    """Prepare (or bring up to date) the store at `out`; returns its manifest. Bad input leaves nothing
    behind (a directory this call created is removed, an earlier store's files are cleared); an interrupted
    prepare keeps its finished shards for the next run to continue from."""
    out = Path(out)
    check_out_dir(out)
    created = not out.exists()
    try:
        return _prepare(
            out,
            inputs=inputs,
            tokenizer_dir=tokenizer_dir,
            workers=workers,
            text_field=text_field,
            eval_fraction=eval_fraction,
            eval_data=eval_data,
            block_bytes=block_bytes,
            shard_bytes=shard_bytes,
            quiet=quiet,
            progress=progress,
            kind=kind,
        )
    except UserError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():
            _clear(out)
        raise


def _prepare(
    out: Path,
    *,
    inputs,
    tokenizer_dir,
    workers,
    text_field,
    eval_fraction,
    eval_data,
    block_bytes,
    shard_bytes,
    quiet,
    progress,
    kind,
) -> dict:
    from models.chat_format import ENDOFTEXT  # here: the workers import this module without torch

    from .tokenizer import install_tokenizer, special_token_ids, tokenizer_fingerprint

    if eval_fraction is not None and not 0 <= eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if kind not in KINDS:
        raise UserError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    if block_bytes < 1 or shard_bytes < 1:
        raise UserError("block and shard sizes must be positive")
    sources = find_sources(inputs)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir, tokenizer = install_tokenizer(tokenizer_dir, out / "tokenizer", quiet=quiet)
    eot = special_token_ids(tokenizer)[ENDOFTEXT]
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    field = text_field if kind == "text" else ""  # SFT and DPO records are whole rows
    config = {
        "kind": kind,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok_dir),
        "sources": [s.stat() for s in sources],
        "text_field": text_field,
        "block_bytes": block_bytes,
        "shard_tokens": max(1, shard_bytes // dtype.itemsize),
        "eval_fraction": eval_fraction,
    }
    manifest_path, state_path = out / MANIFEST, out / STATE
    if manifest_path.is_file() and not state_path.exists():
        old = _read_json(manifest_path)
        if old.get("config") == config and _eval_up_to_date(out, eval_data, tok_dir, text_field, kind):
            if not quiet:
                print(f"prepare: {out} is up to date ({old['tokens']:,} tokens)", flush=True)
            return old
    state = _read_json(state_path) if state_path.is_file() else None
    if state is None or state.get("config") != config:
        if state is not None and not quiet:
            print(f"prepare: the inputs or options changed since {out} was begun; starting again", flush=True)
        _clear(out)
        state = {"config": config, "next": [0, 0], "shards": [], "records": {}, "tokens": 0, "docs": 0, "bytes": 0}
    elif not quiet:
        print(f"prepare: continuing {out} after {len(state['shards'])} shard(s)", flush=True)
    for p in out.glob("*.tmp"):
        p.unlink()

    total = sum(s.size() for s in sources)
    n_workers = workers if workers is not None else (min(os.cpu_count() or 1, 8) if total >= AUTO_WORKERS_BYTES else 0)
    writer = ShardWriter(out, dtype, config["shard_tokens"], len(state["shards"]))
    records: dict[str, int] = state["records"]
    blocks = plan_blocks(sources, field, block_bytes, tuple(state["next"]))
    bar = _progress(total, quiet or not progress, f"prepare {out.name}")
    bar.update(sum(_done_bytes(sources, state)))
    t0, tokens0 = time.perf_counter(), state["tokens"]
    pool = None
    try:
        if n_workers > 0:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(n_workers, _init_worker, (str(tok_dir), eot, kind, vocab))
        for block, result in _results(blocks, pool, n_workers, lambda: _encoder(tok_dir, eot, kind, vocab)):
            before = records.get(block.path, 0)
            if isinstance(result, RecordError):
                raise DataError(f"{record_where(block, result.record, before)}: {result.message}")
            records[block.path] = before + result["records"]
            writer.add(result["tokens"], result["doc_lens"], **result.get("extra", {}))
            state["tokens"] += len(result["tokens"])
            state["docs"] += len(result["doc_lens"])
            state["bytes"] += result["bytes"]
            bar.update(block.disk_bytes)
            rate = (state["tokens"] - tokens0) / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix_str(f"{rate / 1e6:.2f}M tokens/s", refresh=False)
            if writer.full():
                state["shards"].append(writer.finish())
                state["next"] = [block.source, block.index + 1]
                write_json(state_path, state)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    last = writer.finish()
    if last is not None:
        state["shards"].append(last)
    if state["docs"] == 0:
        raise DataError(f"{', '.join(str(p) for p in inputs)}: no {_count(kind, 0)[2:]} in the input (an empty corpus)")
    if eval_data:
        sizes = {"block_bytes": block_bytes, "shard_bytes": shard_bytes}
        prepare(
            eval_data, tok_dir, out / "eval", workers, text_field, quiet=quiet, progress=progress, kind=kind, **sizes
        )
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "crc_bytes": CRC_BYTES,
        "config": config,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eot_id": int(eot),
        "tokenizer_fingerprint": config["tokenizer_fingerprint"],
        "eval_fraction": eval_fraction,
        "tokens": int(state["tokens"]),
        "documents": int(state["docs"]),
        "text_bytes": int(state["bytes"]),
        "shards": state["shards"],
        "content_hash": content_hash(dtype.name, int(eot), state["shards"]),
    }
    write_json(manifest_path, manifest)
    state_path.unlink(missing_ok=True)
    if not quiet:
        print(
            f"prepare: {_count(kind, manifest['documents'])}, {manifest['tokens']:,} tokens in "
            f"{len(manifest['shards'])} shard(s) ({dtype.name}) -> {out} in {seconds:.1f} s",
            flush=True,
        )
    return manifest


def _count(kind: str, docs: int) -> str:
    """'3,000 documents', '300 conversations', '100 pairs' (a DPO pair is three documents)."""
    if kind == "dpo":
        return f"{docs // 3:,} pairs"
    return f"{docs:,} {'conversations' if kind == 'sft' else 'documents'}"


def _results(blocks, pool, n_workers: int, make_encoder):
    """(block, result) in block order, with at most two blocks per worker in flight (bounded memory)."""
    if pool is None:
        enc = make_encoder()
        for block in blocks:
            yield block, _encode(block, enc)
        return
    pending: deque = deque()
    for block in blocks:
        pending.append((block, pool.apply_async(_work, (block,))))
        if len(pending) >= 2 * n_workers:
            b, r = pending.popleft()
            yield b, r.get()
    while pending:
        b, r = pending.popleft()
        yield b, r.get()


def _done_bytes(sources, state) -> list[int]:
    si = state["next"][0]
    return [s.size() for s in sources[:si]]


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _eval_up_to_date(out: Path, eval_data, tok_dir, field, kind) -> bool:
    """The held-out store matches (brought up to date when its inputs changed)."""
    if not eval_data:
        return not (out / "eval").exists()
    return (
        is_store(out / "eval")
        and prepare(eval_data, tok_dir, out / "eval", 0, field, quiet=True, kind=kind) is not None
    )


def parse_mixture(specs: list[str]) -> list[tuple[Path, float | None]]:
    """`PATH` or `PATH:WEIGHT` (a store, or raw files) -> (path, weight or None)."""
    out = []
    for spec in specs:
        path, weight = spec, None
        head, sep, tail = spec.rpartition(":")
        if sep and head and not Path(spec).exists():
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            else:
                path = head
                if not np.isfinite(weight) or weight <= 0:
                    raise UserError(f"--data {spec}: a mixture weight must be a positive number")
        out.append((Path(path), weight))
    return out
