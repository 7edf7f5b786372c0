"""Run a child process and watch it: its peak resident memory (optionally its whole process tree) and when a
file it writes first has content (the first metrics record, i.e. the first step). Shared by the data
benchmarks, which measure whole commands as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _rss(ps: psutil.Process, tree: bool) -> int:
    try:
        kids = ps.children(recursive=True) if tree else []
        return ps.memory_info().rss + sum(c.memory_info().rss for c in kids)
    except psutil.Error:
        return 0


def watch(cmd: list[str], first_file: Path | None = None, tree: bool = False, env=None, every: float = 0.05) -> dict:
    """Run `cmd` from the repository root; exit with its stderr's tail if it fails. Returns peak_mb, first_s
    (seconds until `first_file` had content, None without one), total_s and the child's stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps, peak, first = psutil.Process(proc.pid), 0, None
    while proc.poll() is None:
        peak = max(peak, _rss(ps, tree))
        if first is None and first_file is not None and first_file.exists() and first_file.stat().st_size:
            first = time.perf_counter() - t0
        time.sleep(every)
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{err[-3000:]}")
    return {"peak_mb": peak / 2**20, "first_s": first, "total_s": time.perf_counter() - t0, "stdout": out}


def child_json(code: str, *args, env=None) -> dict:
    """Run `python -c code args...` from the repository root and return the JSON object on its last line
    (a measurement in a fresh process); exit with its stderr's tail if it fails."""
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(f"measurement failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
