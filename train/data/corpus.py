"""What `pretrain --data` names, opened as training and held-out rows.

`--data` takes token stores (`llm-scratch prepare`) and raw files; raw files are prepared by the same code
into the run directory (`RUN/data`, brought up to date on --resume), so there is one data path. A store
prepared with another tokenizer than the run's is refused, naming both fingerprints. `STORE:WEIGHT` mixes
stores by weight (MixedRows in train/data/packing.py).

Held-out rows: `--eval-data` (files or a store) when given; else a store's own `eval/` part; else the last
`--eval-fraction` of each store's rows (default: the store's own --eval-fraction, else 2%).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..engine.distributed import dist_info
from ..errors import UserError
from .packing import MixedRows, PackedDataset, total_rows
from .prepare import parse_mixture, prepare
from .store import TokenStore, is_store
from .tokenizer import tokenizer_fingerprint

DEFAULT_EVAL_FRACTION = 0.02


def open_stores(
    specs: list[str], tokenizer_dir: Path, prepared_dir: Path, workers: int | None = None, progress: bool = True
):
    """[(TokenStore, weight or None)]: the stores named, and the raw files prepared into `prepared_dir`."""
    entries = parse_mixture(specs)
    raw = [p for p, _ in entries if not is_store(p)]
    if any(w is not None for p, w in entries if not is_store(p)):
        raise UserError("--data: a weight needs a store; prepare those files with `llm-scratch prepare` first")
    weights = [w for p, w in entries if is_store(p)]
    if weights and any(w is not None for w in weights) and (None in weights or raw):
        raise UserError("--data: give every store a weight (STORE:WEIGHT) or none")
    stores = [(TokenStore(p), w) for p, w in entries if is_store(p)]
    if raw:
        stores.append((TokenStore(ensure_prepared(raw, tokenizer_dir, prepared_dir, workers, progress)), None))
    for store, _ in stores:
        check_tokenizer(store, tokenizer_dir)
    return stores


def check_tokenizer(store: TokenStore, tokenizer_dir: Path) -> None:
    want = tokenizer_fingerprint(tokenizer_dir)
    if store.tokenizer_fingerprint != want:
        raise UserError(
            f"{store.path} was prepared with another tokenizer (fingerprint {store.tokenizer_fingerprint}) "
            f"than this run's {tokenizer_dir} ({want}); prepare it with this tokenizer"
        )


def ensure_prepared(
    raw: list[Path], tokenizer_dir: Path, out: Path, workers: int | None, progress: bool, kind: str = "text"
) -> Path:
    """Rank 0 prepares (or finds up to date) the store; the other ranks wait for its manifest."""
    rank = dist_info()[0]
    if rank == 0:
        prepare(raw, tokenizer_dir, out, workers=workers, progress=progress, kind=kind)
        return out
    while not is_store(out) or (out / "prepare.state.json").exists():
        time.sleep(0.2)  # a rank 0 that fails exits, and the launcher stops this rank
    return out


def pretrain_rows(stores, seq_len: int, eot_id: int, doc_mask: bool, eval_fraction: float | None, eval_every: int):
    """(training rows, held-out rows or None) from the stores, without --eval-data."""
    train, held = [], []
    for store, _ in stores:
        n = total_rows(store, seq_len)
        own_eval = store.eval_store()
        if own_eval is not None:
            held.append(PackedDataset(own_eval, seq_len, eot_id, doc_mask))
            n_eval = 0
        else:
            frac = eval_fraction if eval_fraction is not None else (store.eval_fraction or DEFAULT_EVAL_FRACTION)
            n_eval = int(n * frac) if eval_every else 0
            if n_eval:
                held.append(PackedDataset(store, seq_len, eot_id, doc_mask, rows=(n - n_eval, n)))
        train.append(PackedDataset(store, seq_len, eot_id, doc_mask, rows=(0, n - n_eval)))
    weights = [w for _, w in stores]
    train_set = train[0] if len(train) == 1 else MixedRows(train, None if weights[0] is None else weights)
    eval_set = None if not held else held[0] if len(held) == 1 else MixedRows(held)
    return train_set, eval_set


def eval_rows(stores, seq_len: int, eot_id: int, doc_mask: bool):
    parts = [PackedDataset(s, seq_len, eot_id, doc_mask) for s, _ in stores]
    return parts[0] if len(parts) == 1 else MixedRows(parts)
