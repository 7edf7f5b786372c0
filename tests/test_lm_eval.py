"""lm-evaluation-harness on an export, offline, with a local task (`make lm-eval` installs it under
.cache/; this slow test runs where it is): through our chat template, with the reasoning cut at
`think_end_token=</think>`, its generations equal `llm-scratch chat --temperature 0`'s answers and its
exact match counts what it should. The command is the one docs/conversion.md shows."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from models import export_hf

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = ROOT / ".cache" / "lm-eval" / "bin" / "lm_eval"
LM_EVAL_BUILT = ROOT / ".cache" / "lm-eval" / ".built"  # written by `make lm-eval`

TASK = """task: scratch_exact
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 40
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _lm_eval(hf_dir: Path, records: list[dict], tmp_path: Path) -> tuple[float, list[str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data, tasks, out = tmp_path / "data.jsonl", tmp_path / "tasks", tmp_path / "out"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks.mkdir()
    (tasks / "scratch.yaml").write_text(TASK.format(data=data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [str(LM_EVAL), "--model", "hf", "--model_args", f"pretrained={hf_dir},think_end_token=</think>,dtype=float32"]
    cmd += ["--include_path", str(tasks), "--tasks", "scratch_exact", "--apply_chat_template", "--device", "cpu"]
    cmd += ["--batch_size", "1", "--log_samples", "--output_path", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    samples = sorted(
        (json.loads(line) for f in out.rglob("samples_*.jsonl") for line in f.read_text().splitlines()),
        key=lambda s: s["doc_id"],
    )
    assert len(samples) == len(records)
    score = sum(s["exact_match"] for s in samples) / len(samples)
    return score, [s["filtered_resps"][0] for s in samples]


@pytest.mark.slow
@pytest.mark.skipif(not LM_EVAL_BUILT.exists(), reason="lm-eval is not installed here: `make lm-eval` installs it")
def test_lm_eval_on_an_export_gives_our_answers(scripted_checkpoint, sft_model_dir, tmp_path):
    from train.chat import ChatSession

    checkpoint, reasoning, answer = scripted_checkpoint
    records = [{"question": "What is 40 + 2?", "answer": answer}, {"question": "What is 7 + 3?", "answer": "10"}]
    score, got = _lm_eval(export_hf(checkpoint, tmp_path / "scripted-hf"), records, tmp_path / "a")
    assert got == [answer, answer] and score == 0.5  # the reasoning cut off; one answer right, one wrong

    records = [{"question": q, "answer": "?"} for q in ("What is 12 + 30?", "What is 105 + 9?")]
    _, got = _lm_eval(export_hf(sft_model_dir, tmp_path / "sft-hf"), records, tmp_path / "b")
    ours = [ChatSession(sft_model_dir, temperature=0.0, max_new_tokens=40).reply(r["question"])[1] for r in records]
    assert [g.strip() for g in got] == ours
