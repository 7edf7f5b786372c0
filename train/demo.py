"""`llm-scratch demo` (what `make demo` runs): the whole pipeline on the embedded data, on CPU.

tokenizer -> pretrain -> SFT -> DPO -> GRPO -> chat, then export to transformers and generate there.
After each stage it measures held-out exact-match accuracy on the arithmetic questions (and the other
chat tasks); after DPO also the preference accuracy and margin on held-out pairs. It ends with a table.
`--seed N` changes every seed of the pipeline: the data, every stage's initialisation, order and samples.
"""

from __future__ import annotations

import functools
import io
import json
import time
from pathlib import Path

import torch

from models.chat_format import ENDOFTEXT, PAD, STOP_TOKENS
from models.checkpoint import atomic_write

from .data.synthetic import generate as generate_data
from .data.tokenizer import load_tokenizer, train_tokenizer
from .errors import UserError
from .outputs import OwnedFiles
from .stages import run_stage

PROMPTS = ["Mia has a red", "Once upon a time, a little"]
RESULTS_FILE = "results.json"  # the demo's figures, as data (the printed table shows the same)
DEMO_MANIFEST = ".llm-scratch-demo.json"  # the files an earlier demo wrote into its --out
DEMO_ENTRIES = (
    "data",
    "tokenizer",
    "pretrain",
    "moe",
    "sft",
    "dpo",
    "grpo",
    "hf",
    "moe_hf",
    "vlm_init",
    "vlm_align",
    "vlm_sft",
    "vlm_dpo",
    "vlm_grpo",
    "vlm_hf",
    RESULTS_FILE,
)
CHAT_QUESTIONS = [("What is 487 + 356?", True), ("What is 702 - 358?", False)]

# (name, default settings, --quick settings)
PLAN = {
    "sizes": (
        dict(pretrain_docs=20000, sft=20000, dpo=3000, rl=4000),
        dict(pretrain_docs=1500, sft=300, dpo=100, rl=50),
    ),
    "preset": ("nano", "micro"),
    "pretrain_steps": (100, 8),
    "moe_steps": (100, 8),
    "sft_steps": (1200, 8),
    "sft_seq_len": (288, 256),  # the column reasoning of a 4-digit problem is ~250 tokens
    # DPO at beta 1, lr 1e-4 for 120 steps (beta 0.1, lr 3e-5, 60 steps before): every held-out miss was a
    # "slip" pair whose rejected answer the reference already puts 19-35 nats down, and beta 0.1 lifted
    # them; reward accuracy on the demo's SFT models of seeds 0 / 1 / 2 went from 94.7 / 92.0 / 86.7% to
    # 99.3 / 96.7 / 96.0% (docs/results.md).
    "dpo_steps": (120, 6),
    "dpo_beta": (1.0, 0.1),
    "dpo_lr": (1e-4, 3e-5),
    # DPO's NLL term on the chosen answers (RPO), text and VLM: it keeps DPO from lowering answer accuracy.
    # Measured on the demo's SFT model (60 steps, lr 3e-5): weight 5 took 3-digit exact match from 99.0% to
    # 93.7%, 20 to 98.0%, 50 kept it (reward accuracy 96.7%, 97.3%, 97.3%); on the VLM, 5 and 20 cost a
    # point of shape accuracy, 50 kept it.
    "dpo_sft_weight": (50, 50),
    "eval_records": (400, 20),
    "vlm_images": (3000, 48),
    "vlm_image_size": (48, 32),
    "vlm_eval_images": (100, 6),
    "vlm_preset": ("nano", "micro"),
    "vlm_align_steps": (100, 4),
    "vlm_sft_steps": (2500, 4),  # shape accuracy after SFT: 91% at 1500 steps, 95% at 2500 (annealed to 0)
    "vlm_dpo_steps": (30, 4),
    # GRPO after DPO: 8 prompts x 8 samples per step (about 4.3 s a step on 2 cores). Measured on an SFT
    # model with 32.5% held-out exact match (2026-12-04): 30 steps at lr 1e-4 gave 30.2%, and DAPO at
    # temperature 1.5 and lr 3e-4 fell to 11.8%: the SFT model's errors are confident (0.04 nats per token),
    # so few groups disagree; a gentle rate. At 5e-5 the demo's run moved greedy accuracy by a point either
    # way per task, and the VLM's 20 steps cost 2 points of shape accuracy (docs/results.md).
    "grpo_steps": (30, 2),
    "grpo_group": (8, 2),
    "grpo_prompts": (8, 2),
    "grpo_lr": (5e-5, 1e-4),
    "grpo_variant": ("grpo", "grpo"),
    "vlm_grpo_steps": (20, 2),
}


def claim_demo_dir(out: Path) -> OwnedFiles:
    """The demo writes only into a new or empty directory or an earlier demo's output, and replaces only
    what an earlier demo wrote there (listed in its manifest); anything else in its way is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MANIFEST).exists():
        raise UserError(
            f"{out} is not empty and not an earlier demo output; choose a new --out (the demo writes "
            f"{', '.join(DEMO_ENTRIES[:4])}, ... there and never overwrites files it did not write)"
        )
    owned = OwnedFiles(out, DEMO_MANIFEST, "the demo")
    owned.claim(DEMO_ENTRIES)
    owned.wrote(())
    return owned


def _stage(argv: list[str], seed: int = 0) -> dict:
    """Run a stage exactly as `llm-scratch STAGE ARGS... --seed SEED` would."""
    return run_stage(argv[0], argv[1:] + ["--seed", str(seed)])


def _accuracy(run_dir: Path, tok, records) -> dict:
    from models import load_pretrained

    from .evaluate import exact_match

    return exact_match(load_pretrained(run_dir).eval(), tok, records, think=True, max_new_tokens=320)


def _arith(res: dict, kind: str) -> str:
    c = sum(v[0] for k, v in res["by_category"].items() if k.startswith(kind))
    n = sum(v[1] for k, v in res["by_category"].items() if k.startswith(kind))
    return f"{c / n:6.1%} ({c}/{n})" if n else "   n/a"


def _arith3(res: dict) -> str:
    c = sum(v[0] for k, v in res["by_category"].items() if k.endswith("3-digit"))
    n = sum(v[1] for k, v in res["by_category"].items() if k.endswith("3-digit"))
    return f"{c / n:6.1%} ({c}/{n})" if n else "   n/a"


def run_demo(out_dir: str | Path = "demo_out", steps: int | None = None, quick: bool = False, seed: int = 0) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' weight-loading bars would clutter the demo's output
    t_all = time.perf_counter()
    out = Path(out_dir)
    q = 1 if quick else 0
    cfg = {k: v[q] for k, v in PLAN.items()}
    if steps:
        cfg["pretrain_steps"] = steps
    total = 10
    owned = claim_demo_dir(out)
    print(f"llm-from-scratch demo -> {out.resolve()} (seed {seed})")
    stage = functools.partial(_stage, seed=seed)

    def _say(n: int, total: int, text: str) -> None:
        owned.wrote(DEMO_ENTRIES)  # what the steps so far wrote is the demo's (a later demo may replace it)
        print(f"\n[{n}/{total}] {text}", flush=True)

    _say(
        1,
        total,
        "synthesizing the embedded data (stories, arithmetic with reasoning, DPO pairs, RL prompts; held-out splits)",
    )
    paths = generate_data(out / "data", seed=seed, **cfg["sizes"])
    for name, p in paths.items():
        print(f"  {name:15s} {p}  ({sum(1 for _ in p.open())} records)")

    _say(2, total, "training the byte-level BPE tokenizer")
    tok_dir = out / "tokenizer"
    stats = train_tokenizer([paths["pretrain_train"], paths["sft_train"]], 4096, tok_dir, quiet=True)
    print(
        f"  {stats['vocab_size']} tokens learned from {stats['bytes'] / 1e6:.1f} MB in {stats['seconds']:.1f} s "
        f"-> {tok_dir}"
    )
    tok = load_tokenizer(tok_dir)
    from .evaluate import load_eval_records

    eval_records = load_eval_records(paths["sft_eval"])[: cfg["eval_records"]]
    acc: dict[str, dict] = {}
    secs: dict[str, float] = {}

    _say(
        3, total, f"pretraining a dense (Qwen2.5-style) model, preset {cfg['preset']!r}, {cfg['pretrain_steps']} steps"
    )
    t0 = time.perf_counter()
    s = cfg["pretrain_steps"]
    pre = stage(
        [
            "pretrain",
            "--data",
            str(paths["pretrain_train"]),
            "--eval-data",
            str(paths["pretrain_eval"]),
            "--tokenizer",
            str(tok_dir),
            "--out",
            str(out / "pretrain"),
            "--max-steps",
            str(s),
            "--preset",
            cfg["preset"],
            "--seq-len",
            "256",
            "--batch-size",
            "16",
            "--eval-every",
            str(max(1, s // 4)),
            "--save-every",
            str(s),
            "--warmup-steps",
            str(max(1, s // 10)),
            "--lr",
            "3e-3",
        ]
    )
    secs["pretrain"] = time.perf_counter() - t0
    print(
        f"  held-out loss {pre['eval_before']['eval_loss']:.3f} -> {pre['eval_after']['eval_loss']:.3f}; "
        f"{pre['tokens_per_s']:,.0f} tokens/s; checkpoint {pre['checkpoint']}; loss plot {pre['plot']}"
    )
    acc["pretrain"] = _accuracy(out / "pretrain", tok, eval_records)
    _samples(out / "pretrain", tok)

    _say(
        4,
        total,
        f"pretraining a DeepSeek-V3-style MoE beside it (MLA + shared and routed experts), preset "
        f"{cfg['preset']!r}, {cfg['moe_steps']} steps",
    )
    t0 = time.perf_counter()
    moe = _moe_stage(out, paths, tok_dir, cfg, pre, stage)
    secs["moe"] = time.perf_counter() - t0

    _say(5, total, f"SFT: chat-formatted reasoning, loss on assistant tokens only, {cfg['sft_steps']} steps")
    t0 = time.perf_counter()
    s = cfg["sft_steps"]
    sft = stage(
        [
            "sft",
            "--init",
            str(out / "pretrain"),
            "--data",
            str(paths["sft_train"]),
            "--eval-data",
            str(paths["sft_eval"]),
            "--out",
            str(out / "sft"),
            "--pack",
            "--seq-len",
            str(cfg["sft_seq_len"]),
            "--batch-size",
            "24",
            "--max-steps",
            str(s),
            "--eval-every",
            str(max(1, s // 4)),
            "--save-every",
            str(s),
            "--warmup-steps",
            str(max(1, s // 30)),
            "--lr",
            "5e-3",
            "--min-lr-ratio",
            "0",
        ]
    )  # annealing to zero: 99.2% vs 95.0% on 3-digit problems (same data)
    secs["sft"] = time.perf_counter() - t0
    print(
        f"  held-out loss {sft['eval_before']['eval_loss']:.3f} -> {sft['eval_after']['eval_loss']:.3f}; "
        f"checkpoint {sft['checkpoint']}"
    )
    acc["sft"] = _accuracy(out / "sft", tok, eval_records)
    print(
        f"  held-out exact match: addition {_arith(acc['sft'], 'addition')}, "
        f"subtraction {_arith(acc['sft'], 'subtraction')}"
    )

    _say(
        6,
        total,
        f"DPO: correct vs plausible wrong reasoning, beta {cfg['dpo_beta']:g}, RPO weight {cfg['dpo_sft_weight']}, "
        f"{cfg['dpo_steps']} steps",
    )
    t0 = time.perf_counter()
    s = cfg["dpo_steps"]
    dpo = stage(
        [
            "dpo",
            "--init",
            str(out / "sft"),
            "--data",
            str(paths["dpo_train"]),
            "--eval-data",
            str(paths["dpo_eval"]),
            "--out",
            str(out / "dpo"),
            "--seq-len",
            str(cfg["sft_seq_len"]),
            "--batch-size",
            "16",
            "--max-steps",
            str(s),
            "--eval-every",
            str(s),
            "--eval-batches",
            "16",
            "--save-every",
            str(s),
            "--warmup-steps",
            str(max(1, s // 10)),
            "--lr",
            str(cfg["dpo_lr"]),
            "--beta",
            str(cfg["dpo_beta"]),
            "--sft-weight",
            str(cfg["dpo_sft_weight"]),
        ]
    )
    secs["dpo"] = time.perf_counter() - t0
    before, after = dpo["eval_before"], dpo["eval_after"]
    print(
        f"  held-out pairs: loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}, reward accuracy "
        f"{after['eval_accuracy']:.1%}, margin {after['eval_margin']:.2f}; the policy prefers the correct answer "
        f"in {before['eval_prefers_chosen']:.1%} -> {after['eval_prefers_chosen']:.1%} of pairs"
    )
    acc["dpo"] = _accuracy(out / "dpo", tok, eval_records)

    _say(
        7,
        total,
        f"GRPO: {cfg['grpo_prompts']} prompts x {cfg['grpo_group']} samples per step, rewarded for the exact "
        f"answer and the format, {cfg['grpo_steps']} steps",
    )
    t0 = time.perf_counter()
    grpo = _grpo(out, paths, cfg, stage)
    secs["grpo"] = time.perf_counter() - t0
    acc["grpo"] = _accuracy(out / "grpo", tok, eval_records)
    print(
        f"  held-out exact match: addition {_arith(acc['grpo'], 'addition')}, "
        f"subtraction {_arith(acc['grpo'], 'subtraction')}; sampled answers right "
        f"{grpo['first_accuracy']:.1%} -> {grpo['last_accuracy']:.1%} (first and last tenth of the steps)"
    )

    _say(8, total, "chat with the final model (greedy): reasoning shown apart from the answer")
    from .chat import ChatSession, Display

    session = ChatSession(out / "grpo", think=True, temperature=0.0, max_new_tokens=320)
    for question, think in CHAT_QUESTIONS:
        session.reset()
        session.think = think
        print(f"  > {question}   ({'thinking on' if think else 'thinking off: --no-think'})")
        buf = io.StringIO()
        session.reply(question, Display(buf))
        print("    " + buf.getvalue().rstrip().replace("\n", "\n    "))

    _say(9, total, "exporting to transformers and generating there from the same weights")
    agree, hf_dir = _export_and_compare(out, tok)

    print(
        f"\nheld-out results ({len(eval_records)} questions, greedy, thinking on; "
        f"{dpo['held_out_pairs']} held-out preference pairs)"
    )
    print(
        f"  {'stage':8s} {'3-digit +/-':>16s} {'addition':>16s} {'subtraction':>16s} {'all tasks':>9s} "
        f"{'prefers correct':>15s} {'reward acc':>10s} {'margin':>7s}"
    )
    prefs = {"pretrain": None, "SFT": before, "DPO": after, "GRPO": None}
    rows = (("pretrain", acc["pretrain"]), ("SFT", acc["sft"]), ("DPO", acc["dpo"]), ("GRPO", acc["grpo"]))
    for name, res in rows:
        p = prefs[name]
        pref = (
            f"{p['eval_prefers_chosen']:15.1%} {p['eval_accuracy']:10.1%} {p['eval_margin']:7.2f}"
            if p
            else f"{'':15s} {'':10s} {'':7s}"
        )
        print(
            f"  {name:8s} {_arith3(res):>16s} {_arith(res, 'addition'):>16s} {_arith(res, 'subtraction'):>16s} "
            f"{res['overall']:9.1%} {pref}"
        )
    text_elapsed = time.perf_counter() - t_all
    print(
        "  prefers correct: share of held-out pairs where the model gives the correct answer the higher "
        "log-probability; reward acc and margin: DPO's implicit rewards (zero at the SFT row, where the "
        "policy is the reference)"
    )
    print(
        f"text models done in {text_elapsed:.0f} s (pretrain {secs['pretrain']:.0f} s, MoE {secs['moe']:.0f} s, "
        f"SFT {secs['sft']:.0f} s, DPO {secs['dpo']:.0f} s, GRPO {secs['grpo']:.0f} s)"
    )

    from .demo_vlm import print_vlm_table, run_vlm_demo

    vlm = run_vlm_demo(out, out / "grpo", tok, cfg, stage, lambda text: _say(10, total, text), grpo_argv, seed)
    print_vlm_table(vlm)
    elapsed = time.perf_counter() - t_all
    print(
        f"\ndemo done in {elapsed:.0f} s (text models {text_elapsed:.0f} s, VLM {vlm['seconds']:.0f} s). "
        f"Outputs under {out}: data/, tokenizer/, pretrain/, moe/, sft/, dpo/, grpo/, vlm_*/ (each with metrics.jsonl "
        f"and loss.png), hf/, moe_hf/ and vlm_hf/ (transformers)."
    )
    print(
        f"Next: llm-scratch chat --checkpoint {out / 'grpo'}    or    llm-scratch chat --checkpoint "
        f"{out / vlm['final']} --image {out / 'data' / 'images' / 'eval_00000.png'}"
    )
    results = {
        "text_accuracy": {name: {"overall": r["overall"], "by_category": r["by_category"]} for name, r in acc.items()},
        "pretrain": {
            "eval_loss_before": pre["eval_before"]["eval_loss"],
            "eval_loss_after": pre["eval_after"]["eval_loss"],
        },
        "moe": {k: moe[k] for k in ("load_peak", "load_last", "hf_max_diff")}
        | {"eval_loss_after": moe["eval_after"]["eval_loss"]},
        "dpo_pairs": {"before": before, "after": after, "held_out_pairs": dpo["held_out_pairs"]},
        "grpo": {k: grpo[k] for k in ("first_accuracy", "last_accuracy", "first_reward", "last_reward")},
        "seed": seed,
        "chat_agrees_with_transformers": [agree, len(CHAT_QUESTIONS)],
        "vlm": {
            "accuracy": vlm["accuracy"],
            "hf_max_diff": vlm["hf_max_diff"],
            "dpo_reward_accuracy": vlm["dpo"]["eval_after"]["eval_accuracy"],
        },
        "seconds": {**secs, "text": text_elapsed, "vlm": vlm["seconds"], "all": elapsed},
    }
    atomic_write(out / RESULTS_FILE, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    owned.wrote(DEMO_ENTRIES)
    return results


def grpo_argv(init: Path, data: Path, out: Path, cfg: dict, steps: int, max_new_tokens: int) -> list[str]:
    """The demo's GRPO stage (text and VLM alike): one micro-batch holds the whole rollout."""
    group, prompts = cfg["grpo_group"], cfg["grpo_prompts"]
    return [
        "grpo",
        "--init",
        str(init),
        "--data",
        str(data),
        "--out",
        str(out),
        "--group-size",
        str(group),
        "--prompts-per-step",
        str(prompts),
        "--batch-size",
        str(group * prompts),
        "--max-new-tokens",
        str(max_new_tokens),
        "--max-steps",
        str(steps),
        "--eval-every",
        "0",
        "--save-every",
        str(steps),
        "--lr",
        str(cfg["grpo_lr"]),
        "--variant",
        cfg["grpo_variant"],
    ]


def _grpo(out: Path, paths: dict, cfg: dict, stage) -> dict:
    """GRPO from the DPO model on the RL prompts; returns the stage's summary with the sampled accuracy and
    reward over the first and the last tenth of its steps."""
    from .engine.metrics import read_metrics

    summary = stage(grpo_argv(out / "dpo", paths["rl_train"], out / "grpo", cfg, cfg["grpo_steps"], 320))
    steps = [r for r in read_metrics(out / "grpo" / "metrics.jsonl") if "reward" in r]
    tenth = max(1, len(steps) // 10)
    for key in ("accuracy", "reward"):
        summary[f"first_{key}"] = sum(r[key] for r in steps[:tenth]) / tenth
        summary[f"last_{key}"] = sum(r[key] for r in steps[-tenth:]) / tenth
    return summary


def _moe_stage(out: Path, paths: dict, tok_dir: Path, cfg: dict, dense: dict, stage) -> dict:
    """Pretrain the MoE model on the dense run's data and schedule; print both held-out losses, the
    expert load balance as the bias update works, the latent cache size, and transformers parity."""
    from models import export_hf, load_pretrained

    from .engine.metrics import read_metrics

    s = cfg["moe_steps"]
    moe = stage(
        [
            "pretrain",
            "--model",
            "moe",
            "--data",
            str(paths["pretrain_train"]),
            "--eval-data",
            str(paths["pretrain_eval"]),
            "--tokenizer",
            str(tok_dir),
            "--out",
            str(out / "moe"),
            "--max-steps",
            str(s),
            "--preset",
            cfg["preset"],
            "--seq-len",
            "256",
            "--batch-size",
            "16",
            "--eval-every",
            str(max(1, s // 4)),
            "--save-every",
            str(s),
            "--warmup-steps",
            str(max(1, s // 10)),
            "--lr",
            "3e-3",
        ]
    )
    print(
        f"  held-out loss: MoE {moe['eval_before']['eval_loss']:.3f} -> {moe['eval_after']['eval_loss']:.3f} "
        f"({moe['parameters'] / 1e6:.2f}M parameters), dense {dense['eval_after']['eval_loss']:.3f} "
        f"({dense['parameters'] / 1e6:.2f}M)"
    )
    loads = [r["load_max_mean"] for r in read_metrics(out / "moe" / "metrics.jsonl") if "load_max_mean" in r]
    tenth = max(1, len(loads) // 10)
    peak = max(sum(loads[i : i + tenth]) / tenth for i in range(len(loads) - tenth + 1))
    last = sum(loads[-tenth:]) / tenth
    print(
        f"  expert load, busiest expert / mean (1.00 = balanced), mean over MoE layers and {tenth} steps: "
        f"worst {peak:.2f} -> last {last:.2f} (auxiliary-loss-free bias update)"
    )
    model = load_pretrained(out / "moe").eval()
    dense_model = load_pretrained(out / "pretrain")
    dc = dense_model.config
    gqa = dc.num_hidden_layers * 2 * dc.num_key_value_heads * dc.head_dim * 2
    print(f"  KV cache per token (bf16): MoE latent {model.cache_bytes_per_token()} bytes vs dense GQA {gqa} bytes")
    from transformers import AutoModelForCausalLM

    hf_dir = export_hf(out / "moe", out / "moe_hf")
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    print(f"  exported as transformers {type(hf).__name__}: max |logit difference| {diff:.1e}")
    return {**moe, "load_peak": peak, "load_last": last, "hf_max_diff": diff}


def _samples(run_dir: Path, tok) -> None:
    from models import load_pretrained
    from models.generate import generate

    model = load_pretrained(run_dir)
    stop, pad = [tok.convert_tokens_to_ids(ENDOFTEXT)], tok.convert_tokens_to_ids(PAD)
    outs = generate(model, [tok.encode(p, add_special_tokens=False) for p in PROMPTS], 30, stop_ids=stop, pad_id=pad)
    for p, new in zip(PROMPTS, outs):
        print(f"  sample: {p!r} -> {tok.decode(new, skip_special_tokens=True)!r}")


def _export_and_compare(out: Path, tok) -> tuple[int, Path]:
    from transformers import AutoModelForCausalLM

    from models import export_hf, load_pretrained
    from models.generate import generate

    hf_dir = export_hf(out / "grpo", out / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    ours = load_pretrained(out / "grpo")
    stop = [tok.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    pad = tok.convert_tokens_to_ids(PAD)
    agree = 0
    for question, think in CHAT_QUESTIONS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True, enable_thinking=think
        )
        ids = tok.encode(text, add_special_tokens=False)
        budget = min(320, ours.config.max_position_embeddings - len(ids))  # both stop at the model's context
        mine = generate(ours, [ids], budget, stop_ids=stop, pad_id=pad)[0]
        with torch.no_grad():
            gen = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=budget, do_sample=False, eos_token_id=stop, pad_token_id=pad
            )
        agree += gen[0, len(ids) :].tolist() == mine
    print(
        f"  transformers {type(hf_model).__name__} loaded {hf_dir} without trust_remote_code; "
        f"{agree}/{len(CHAT_QUESTIONS)} chat answers are token-for-token the same as our model's"
    )
    return agree, hf_dir
