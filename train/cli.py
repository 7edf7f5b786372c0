"""`llm-scratch`: one command for every stage.

llm-scratch data --out DIR                  write the embedded synthetic data sets
llm-scratch tokenizer --data F... --vocab-size N --out DIR
llm-scratch pretrain --data F... --tokenizer DIR --out DIR [--preset tiny]
llm-scratch sft --init DIR --data F... --out DIR
llm-scratch dpo --init DIR --data F... --out DIR
llm-scratch grpo --init DIR --data PROMPTS... --out DIR   RL with verifiable rewards
llm-scratch vlm-init --llm DIR --out DIR    a VLM from a dense model and a fresh vision tower
llm-scratch chat --checkpoint DIR [--think|--no-think] [--prompt TEXT]
llm-scratch serve --checkpoint DIR [--port 8000] an OpenAI-compatible server (reasoning apart)
llm-scratch eval --checkpoint DIR --data EVAL.jsonl
llm-scratch export --checkpoint DIR --out HF_DIR
llm-scratch sample --checkpoint DIR --prompt TEXT
llm-scratch demo [--out DIR]                the whole pipeline on CPU
llm-scratch verify                          every stage for a few steps: losses fall, GRPO rewards rise
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kernels

from .args import add_kernels_arg
from .errors import UserError, run_guarded
from .stages import STAGES

SUMMARY_KEYS = ("end_step", "first_loss", "last_loss", "checkpoint", "plot")


def byte_size(text: str) -> int:
    """'500M' -> 500_000_000 (K, M, G are powers of 1000)."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        n = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500M") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return int(n)


def cmd_data(ns) -> None:
    from .data.synthetic import generate
    from .outputs import OwnedFiles

    out = Path(ns.out)
    owned = OwnedFiles(out, ".llm-scratch-data.json", "llm-scratch data")
    names = [f"{name}_{split}.jsonl" for name in ("pretrain", "sft", "dpo", "rl") for split in ("train", "eval")]
    if ns.images:
        names += ["images"] + [f"vlm_{k}_{s}.jsonl" for k in ("caption", "sft", "dpo") for s in ("train", "eval")]
    owned.claim(names)  # an earlier `data` run's files are replaced; anything else in the way is refused
    paths = generate(ns.out, seed=ns.seed, pretrain_docs=ns.pretrain_docs, sft=ns.sft, dpo=ns.dpo, rl=ns.rl)
    if ns.images:
        from .data.synthetic_images import generate_images

        paths.update(
            generate_images(ns.out, seed=ns.seed, train=ns.images, held_out=max(1, ns.images // 10), size=ns.image_size)
        )
    owned.wrote(names)
    for name, p in paths.items():
        print(f"{name:15s} {p}")


def cmd_tokenizer(ns) -> None:
    from models.checkpoint import TOKENIZER_FILES

    from .data.tokenizer import train_tokenizer
    from .outputs import check_new_or_own

    check_new_or_own(Path(ns.out), TOKENIZER_FILES, "tokenizer directory")
    stats = train_tokenizer(ns.data, ns.vocab_size, ns.out, quiet=ns.quiet, max_bytes=ns.max_bytes)
    print(
        f"tokenizer: {stats['vocab_size']} tokens from {stats['bytes'] / 1e6:.1f} MB in "
        f"{stats['seconds']:.1f} s -> {ns.out}"
    )


def cmd_prepare(ns) -> None:
    from .data.prepare import prepare

    prepare(
        ns.data,
        ns.tokenizer,
        ns.out,
        workers=ns.workers,
        text_field=ns.text_field,
        eval_fraction=ns.eval_fraction,
        eval_data=ns.eval_data,
        block_bytes=int(ns.block_mb * (1 << 20)),
        shard_bytes=int(ns.shard_mb * (1 << 20)),
        quiet=ns.quiet,
        kind=ns.kind,
    )


def cmd_stage(ns) -> None:
    s = ns.stage.module.run(ns)
    print(json.dumps({k: s[k] for k in SUMMARY_KEYS if k in s}, indent=2))


def check_generation_options(ns) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty in range, before any loading."""
    from models.generate import check_sampling

    try:
        check_sampling(
            ns.max_new_tokens,
            getattr(ns, "temperature", 0.0),
            getattr(ns, "top_k", None),
            getattr(ns, "top_p", None),
            getattr(ns, "repetition_penalty", 1.0),
        )
    except ValueError as e:
        raise UserError(f"--{str(e).replace('_', '-')}") from None


def cmd_chat(ns) -> None:
    from .chat import run_chat

    check_generation_options(ns)
    run_chat(ns)


def cmd_serve(ns) -> None:
    from .serve.app import run_serve

    if ns.slots < 1:
        raise UserError(f"--slots must be at least 1, got {ns.slots}")
    if not 0 <= ns.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {ns.port}")
    run_serve(ns)


def cmd_eval(ns) -> None:
    from models import load_pretrained

    from .data.tokenizer import check_vocab, load_tokenizer, tokenizer_dir_for
    from .evaluate import exact_match, load_eval_records

    check_generation_options(ns)
    model = load_pretrained(ns.checkpoint).eval()
    tok = load_tokenizer(tokenizer_dir_for(ns.checkpoint))
    check_vocab(tok, model, ns.checkpoint)
    records = [r for path in ns.data for r in load_eval_records(path, ns.images_anywhere)][: ns.limit]
    res = exact_match(model, tok, records, think=ns.think, max_new_tokens=ns.max_new_tokens)
    for name, (c, n) in res["by_category"].items():
        print(f"{name:24s} {c:5d}/{n:<5d} {c / n:7.1%}")
    print(f"{'overall':24s} {res['correct']:5d}/{res['total']:<5d} {res['overall']:7.1%}")


def cmd_verify(ns) -> None:
    from .verify import run_verify

    run_verify(ns.out)


def cmd_export(ns) -> None:
    from models import export_hf
    from models.convert import export_gguf

    if ns.consolidate_zero:
        print(f"consolidating the DeepSpeed ZeRO shards of {ns.checkpoint} (unpickled: trusted files only)")
    if ns.format == "gguf":
        out = export_gguf(ns.checkpoint, ns.out, ns.gguf_type, consolidate_zero=ns.consolidate_zero)
        print(f"exported a GGUF file ({ns.gguf_type}) to {out}")
        return
    if ns.gguf_type != "f16":
        raise UserError("--gguf-type is for --format gguf")
    out = export_hf(ns.checkpoint, ns.out, consolidate_zero=ns.consolidate_zero)
    print(f"exported a transformers checkpoint to {out}")


def cmd_sample(ns) -> None:
    from .sample import sample_text

    check_generation_options(ns)
    print(
        sample_text(
            ns.checkpoint,
            ns.prompt,
            max_new_tokens=ns.max_new_tokens,
            temperature=ns.temperature,
            top_k=ns.top_k,
            top_p=ns.top_p,
            seed=ns.seed,
        )
    )


def cmd_demo(ns) -> None:
    from .demo import run_demo

    run_demo(ns.out, steps=ns.steps, quick=ns.quick, seed=ns.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-scratch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("data", help="write the embedded synthetic data (pretrain/SFT/DPO, train+eval)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pretrain-docs", type=int, default=20000)
    s.add_argument("--sft", type=int, default=4000)
    s.add_argument("--dpo", type=int, default=2000)
    s.add_argument("--rl", type=int, default=2000, help="RL prompts with answers (the grpo stage's data)")
    s.add_argument("--images", type=int, default=0, help="also this many VLM training images (+10%% held out)")
    s.add_argument("--image-size", type=int, default=32)
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    s.add_argument("--data", nargs="+", required=True, metavar="PATH", help="any input prepare reads, or SFT/DPO data")
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument(
        "--max-bytes",
        type=byte_size,
        metavar="N[K|M|G]",
        help="train on a sample of about this many bytes of the inputs, taken evenly along each (default: all)",
    )
    s.add_argument("--out", required=True)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_tokenizer)

    s = sub.add_parser("prepare", help="tokenize a corpus once into a token store that training memory-maps")
    s.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help=".txt/.jsonl/.jsonl.gz/.parquet files, directories of them, or `datasets` save_to_disk directories",
    )
    s.add_argument("--tokenizer", required=True, metavar="DIR", help="this project's or another model's tokenizer")
    s.add_argument("--out", required=True, metavar="STORE")
    s.add_argument("--workers", type=int, help="tokenizing processes (default: one per core from 32 MB of input)")
    s.add_argument(
        "--kind",
        choices=("text", "sft", "dpo"),
        default="text",
        help="text: a pretraining corpus; sft: conversations with their loss masks; dpo: preference pairs",
    )
    s.add_argument("--text-field", default="text", help="the jsonl field or parquet/Arrow column of the text")
    held = s.add_mutually_exclusive_group()
    held.add_argument("--eval-fraction", type=float, help="the store's default share of rows a run holds out")
    held.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out inputs, prepared into STORE/eval")
    s.add_argument("--block-mb", type=float, default=4, help="input per unit of work")
    s.add_argument("--shard-mb", type=float, default=256, help="size of a shard of token ids")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_prepare)

    for name, stage in STAGES.items():
        s = sub.add_parser(name, help=stage.help)
        stage.module.build_parser(s)
        s.set_defaults(fn=cmd_stage, stage=stage)

    s = sub.add_parser("chat", help="chat with a model; reasoning shown apart from the answer")
    s.add_argument("--checkpoint", required=True, help="a checkpoint, run or transformers directory")
    s.add_argument("--think", dest="think", action="store_true", default=True, help="let the model reason (default)")
    s.add_argument("--no-think", dest="think", action="store_false", help="answer directly (empty think block)")
    s.add_argument("--prompt", help="one message, answered once (no REPL)")
    s.add_argument("--system", help="a system message")
    s.add_argument("--image", metavar="FILE", help="a VLM: an image the conversation is about")
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (deterministic)")
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    add_kernels_arg(s)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: chat (reasoning apart) and completions")
    s.add_argument("--checkpoint", required=True, help="a checkpoint, run or transformers directory")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ requests")
    s.add_argument("--model-name", default=None, help="the model id clients name (default: the directory's name)")
    s.add_argument("--slots", type=int, default=16, help="sequences decoded together (continuous batching)")
    add_kernels_arg(s)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("eval", help="held-out exact-match accuracy (records with 'messages' and 'answer')")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", nargs="+", required=True, metavar="FILE")
    s.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
    s.add_argument("--no-think", dest="think", action="store_false", default=True)
    s.add_argument("--max-new-tokens", type=int, default=384)
    s.add_argument("--images-anywhere", action="store_true", help="allow image paths outside the data file's directory")
    add_kernels_arg(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("verify", help="every model through every stage for a few steps, on fresh tiny data")
    s.add_argument("--out", default=None, help="keep the outputs here (default: a temporary directory)")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("export", help="write a native transformers checkpoint, or a GGUF file for llama.cpp")
    s.add_argument("--checkpoint", required=True, help="a checkpoint, run or transformers directory")
    s.add_argument(
        "--out",
        required=True,
        help="transformers: a new or empty directory, or an earlier export (replaced whole); gguf: a file",
    )
    s.add_argument("--format", choices=("transformers", "gguf"), default="transformers")
    s.add_argument(
        "--gguf-type", choices=("f32", "f16", "bf16", "q8_0"), default="f16", help="GGUF weight type (default f16)"
    )
    s.add_argument(
        "--consolidate-zero",
        action="store_true",
        help="the checkpoint is a bare DeepSpeed ZeRO directory (shards only): consolidate it. DeepSpeed's "
        "loader unpickles the shards, which can run code: only for files you trust",
    )
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("sample", help="continue a text prompt with a trained model")
    s.add_argument("--checkpoint", required=True, help="a checkpoint, run or transformers directory")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int, default=0)
    add_kernels_arg(s)
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("demo", help="the whole pipeline on synthetic data, on CPU")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the demo's)")
    s.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")
    s.add_argument("--seed", type=int, default=0, help="the seed of every part: data, models, order, samples")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)

    def command() -> None:
        with kernels.use_backend(getattr(ns, "kernels", None)):  # --kernels, for every command that has it
            ns.fn(ns)

    run_guarded(command)


if __name__ == "__main__":
    main()
