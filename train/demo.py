"""`llm-scratch demo` (what `make demo` runs): the whole pipeline on the embedded data, on CPU.

1. synthesize the data sets; 2. train the tokenizer; 3. pretrain a ~3M-parameter dense model;
4. print greedy samples; 5. export to transformers, reload there, generate, and compare.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .cli import build_parser as _cli_parser
from .pretrain import run as run_pretrain
from .synthetic import generate as generate_data
from .tokenizer import ENDOFTEXT, PAD, load_tokenizer, train_tokenizer

PROMPTS = ["Mia has a red", "Once upon a time, a little", "The sum of 25 and 17 is"]


def _say(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def run_demo(out_dir: str | Path = "demo_out", steps: int | None = None, quick: bool = False) -> dict:
    t_all = time.perf_counter()
    out = Path(out_dir)
    steps = steps or (10 if quick else 240)
    print(f"llm-from-scratch demo -> {out.resolve()}")

    _say(1, "synthesizing the embedded data (stories, arithmetic, SFT/DPO sets with held-out splits)")
    sizes = dict(pretrain_docs=1500, sft=200, dpo=100) if quick else dict(pretrain_docs=20000, sft=4000, dpo=2000)
    paths = generate_data(out / "data", seed=0, **sizes)
    for name, p in paths.items():
        print(f"  {name:15s} {p}  ({sum(1 for _ in p.open())} records)")

    _say(2, "training the byte-level BPE tokenizer")
    stats = train_tokenizer([paths["pretrain_train"], paths["sft_train"]], 4096, out / "tokenizer", quiet=True)
    print(f"  {stats['vocab_size']} tokens learned from {stats['bytes'] / 1e6:.1f} MB in {stats['seconds']:.1f} s "
          f"-> {out / 'tokenizer'}")

    _say(3, f"pretraining a dense (Qwen2.5-style) model for {steps} steps on CPU")
    run_dir = out / "pretrain"
    argv = ["pretrain", "--data", str(paths["pretrain_train"]), "--eval-data", str(paths["pretrain_eval"]),
            "--tokenizer", str(out / "tokenizer"), "--out", str(run_dir), "--max-steps", str(steps),
            "--preset", "micro" if quick else "tiny", "--seq-len", "128" if quick else "256",
            "--batch-size", "8" if quick else "16", "--eval-every", str(max(1, steps // 8)),
            "--save-every", str(steps), "--warmup-steps", str(max(1, steps // 10)), "--lr", "3e-3"]
    if (run_dir / "latest").exists():  # a previous demo's run: start it again
        import shutil

        shutil.rmtree(run_dir)
    summary = run_pretrain(_cli_parser().parse_args(argv))
    before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
    print(f"  held-out loss {before:.3f} -> {after:.3f} (perplexity {summary['eval_before']['eval_ppl']:.1f} -> "
          f"{summary['eval_after']['eval_ppl']:.2f}); {summary['tokens_per_s']:,.0f} tokens/s")
    print(f"  checkpoint {summary['checkpoint']}\n  metrics {run_dir / 'metrics.jsonl'}\n  loss plot {summary['plot']}")

    _say(4, "greedy samples from our model")
    from models import load_pretrained
    from models.generate import generate

    tok = load_tokenizer(out / "tokenizer")
    ours = load_pretrained(run_dir)
    stop, pad = [tok.convert_tokens_to_ids(ENDOFTEXT)], tok.convert_tokens_to_ids(PAD)
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    our_new = generate(ours, prompt_ids, 40, stop_ids=stop, pad_id=pad)
    for p, new in zip(PROMPTS, our_new):
        print(f"  {p!r} -> {tok.decode(new, skip_special_tokens=True)!r}")

    _say(5, "exporting to transformers and generating there from the same weights")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import export_hf

    hf_dir = export_hf(run_dir, out / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    agree = 0
    for p, new in zip(PROMPTS, our_new):
        ids = torch.tensor([hf_tok.encode(p, add_special_tokens=False)])
        with torch.no_grad():
            gen = hf_model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=stop, pad_token_id=pad)
        hf_new = gen[0, ids.shape[1]:].tolist()
        agree += hf_new == new
        print(f"  transformers {type(hf_model).__name__}: {p!r} -> {hf_tok.decode(hf_new, skip_special_tokens=True)!r}")
    print(f"  {agree}/{len(PROMPTS)} prompts give the same tokens in transformers as in our model -> {hf_dir}")
    elapsed = time.perf_counter() - t_all
    print(f"\ndemo done in {elapsed:.0f} s. Outputs: data {out / 'data'}, tokenizer {out / 'tokenizer'}, "
          f"run {run_dir}, transformers export {hf_dir}")
    return {"summary": summary, "agree": agree, "seconds": elapsed}
