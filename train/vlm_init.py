"""`llm-scratch vlm-init`: a VLM checkpoint from a trained dense model and a fresh vision tower.

    llm-scratch vlm-init --llm RUN_OR_CHECKPOINT --out DIR [--preset nano] [--image-size 32 --patch-size 8]

The language model's weights are copied unchanged; the encoder and projector start from random
weights (nothing can be downloaded) and learn in the alignment stage:
    llm-scratch sft --init DIR --data vlm_caption_train.jsonl --train projector,vision ...   (alignment)
    llm-scratch sft --init ALIGNED --data vlm_sft_train.jsonl ...                            (image QA)
    llm-scratch dpo --init SFT --data vlm_dpo_train.jsonl ...                                 (preferences)
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from models import PRESETS, VLM, ConfigError, VLMConfig, load_pretrained, save_model
from models.chat_format import IMAGE
from models.checkpoint import CHECKSUMS_FILE, CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE

from .data.tokenizer import load_tokenizer, tokenizer_dir_for
from .errors import UserError, run_guarded
from .outputs import check_new_or_own


def init_vlm(llm: str, out: str, preset: str = "nano", seed: int = 0, **overrides) -> Path:
    check_new_or_own(Path(out), (*TOKENIZER_FILES, CONFIG_FILE, WEIGHTS_FILE, CHECKSUMS_FILE), "model directory")
    dense = load_pretrained(llm)
    if dense.config.model_type != "dense":
        raise UserError(f"--llm: {llm} is a {dense.config.model_type} model; the VLM's language model is dense")
    presets = PRESETS["vlm"]
    if preset not in presets:
        raise UserError(f"--preset: unknown VLM preset {preset!r}; choose one of {sorted(presets)}")
    tok_dir = tokenizer_dir_for(llm)
    image_id = load_tokenizer(tok_dir).convert_tokens_to_ids(IMAGE)
    fields = {**presets[preset], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        config = VLMConfig(text_config=dataclasses.replace(dense.config), image_token_id=image_id, **fields).validate()
    except (ConfigError, TypeError) as e:
        raise UserError(str(e)) from None
    torch.manual_seed(seed)
    model = VLM(config)
    model.language_model.load_state_dict(dense.state_dict())
    return save_model(model, out, tok_dir)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="llm-scratch vlm-init", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--llm", required=True, help="the dense model: a run, checkpoint or transformers directory")
    p.add_argument("--out", required=True, help="where the VLM checkpoint goes")
    p.add_argument("--preset", default="nano", help="vision tower size (micro, nano, small)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--pixel-shuffle", type=int, help="merge r x r patches into one image token")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(ns: argparse.Namespace) -> dict:
    out = init_vlm(
        ns.llm,
        ns.out,
        ns.preset,
        ns.seed,
        image_size=ns.image_size,
        patch_size=ns.patch_size,
        pixel_shuffle=ns.pixel_shuffle,
    )
    print(f"vlm-init: wrote {out} (vision tower preset {ns.preset!r} + the language model of {ns.llm})")
    return {"checkpoint": str(out)}


def main(argv: list[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_guarded(main)
