"""Metrics as JSON lines (one object per event) and the loss-curve plot drawn from them."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

from ..errors import UserError


class MetricsLog:
    """Appends records to OUT/metrics.jsonl (never through a symbolic link). On resume, records past the
    resumed step are dropped (they came from work after the last checkpoint, which is being redone), and
    so is a torn last line (a run killed or a disk filled in the middle of a write)."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            kept = [r for r in read_metrics(path, allow_torn_end=True) if r.get("step", 0) <= resume_step]
        with self._open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))

    def _open(self, mode: str):
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if mode == "a" else os.O_TRUNC)
        try:
            return os.fdopen(os.open(self.path, flags, 0o644), mode)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{self.path} is a symbolic link; refusing to write through it") from None
            raise

    def write(self, record: dict) -> None:
        if self.enabled:
            with self._open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path, allow_torn_end: bool = False) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not JSON is an error naming it, except, with
    `allow_torn_end`, the last line (cut short when a run died in the middle of writing it)."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1) if line.strip()]
    out = []
    for k, (i, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if allow_torn_end and k == len(lines) - 1:
                print(f"note: {path}:{i}: dropped a torn last line", file=sys.stderr)
                break
            raise UserError(f"{path}:{i}: not a JSON record") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{i}: not a JSON object")
        out.append(rec)
    return out


def plot_losses(metrics_path: Path, png_path: Path, title: str = "training loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
