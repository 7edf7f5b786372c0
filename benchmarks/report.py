"""Turn a pytest-benchmark JSON file into a dated markdown table under benchmarks/results/.

python -m benchmarks.report .benchmarks/cpu.json
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def write_table(lines: list[str], name: str, out_dir: Path | None = None, echo: bool = True) -> Path:
    """Write a dated markdown table as results/NAME (under a temporary name, then renamed), print it (unless
    `echo` is False), return its path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    if echo:
        print("\n".join(lines))
    return path


def main(path: str) -> Path:
    data = json.loads(Path(path).read_text())
    rows = {b["extra_info"]["impl"]: b for b in data["benchmarks"]}
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw") or platform.processor() or "cpu"
    date = dt.date.today().isoformat()
    lines = [
        f"# CPU training step: ours vs transformers Qwen2ForCausalLM ({date})",
        "",
        f"Device: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        "One step = forward + backward + AdamW on the same config, weights and batch "
        "(benchmarks/test_train_step_cpu.py). Median of 15 rounds after 2 warm-up rounds.",
        "",
        "| implementation | params | tokens/step | median (ms) | min (ms) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for impl in ("ours", "transformers"):
        b = rows[impl]
        med = b["stats"]["median"]
        info = b["extra_info"]
        lines.append(
            f"| {impl} | {info['parameters'] / 1e6:.2f}M | {info['tokens']} | {med * 1e3:.1f} | "
            f"{b['stats']['min'] * 1e3:.1f} | {info['tokens'] / med:,.0f} |"
        )
    ratio = rows["transformers"]["stats"]["median"] / rows["ours"]["stats"]["median"]
    # run-to-run noise: the larger relative interquartile range of the two
    noise = max(b["stats"]["iqr"] / b["stats"]["median"] for b in rows.values())
    if abs(ratio - 1) <= noise:
        verdict = f"the same speed within run-to-run noise (IQR {noise:.1%})"
    else:
        verdict = "ours is faster" if ratio > 1 else "ours is slower"
    lines += ["", f"Speed ratio (transformers time / our time): **{ratio:.2f}x**: {verdict}."]
    out = Path(__file__).parent / "results" / f"{date}-cpu-train-step.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1])
