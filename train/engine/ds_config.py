"""DeepSpeed configs: the JSON files in ds_configs/ with their run-dependent values filled in.

This is the one place where "auto" is resolved (the convention of transformers' DeepSpeed
integration). Each key below is either "auto" in the file, absent, or equal to what the run's
arguments say; any other value is an error naming the key and the option it contradicts.

| config key                                   | filled from                               |
|----------------------------------------------|-------------------------------------------|
| train_micro_batch_size_per_gpu               | --batch-size                              |
| gradient_accumulation_steps                  | --grad-accum                              |
| train_batch_size                             | batch-size x grad-accum x world size      |
| gradient_clipping                            | --grad-clip                               |
| optimizer.params.lr / betas / eps / weight_decay | --lr, (beta1, beta2), eps, --weight-decay |
| bf16.enabled                                 | true on CUDA with bf16 support, else false (fp32 on CPU) |
| zero_optimization.reduce_bucket_size         | hidden_size^2                             |
| zero_optimization.stage3_prefetch_bucket_size | 0.9 x hidden_size^2                      |
| zero_optimization.stage3_param_persistence_threshold | 10 x hidden_size                  |

The learning-rate schedule is the trainer's own (warmup + cosine, as in a plain run), so a config
must not carry a "scheduler" section.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import UserError

AUTO = "auto"


def load_ds_config(path: str | Path) -> dict:
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p}: a DeepSpeed config must be a JSON object")
    return cfg


OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def check_ds_config(cfg: dict, path: str | Path) -> None:
    """What can be checked before DeepSpeed starts: the ZeRO stage and the offload devices."""
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f'{path}: "zero_optimization" must be an object')
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f'{path}: "zero_optimization.stage" must be 0, 1, 2 or 3, got {json.dumps(stage)}')
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if section is None:
            continue
        device = section.get("device") if isinstance(section, dict) else None
        if device not in OFFLOAD_DEVICES:
            raise UserError(f'{path}: "zero_optimization.{key}.device" must be one of {", ".join(OFFLOAD_DEVICES)}')
        if key == "offload_param" and device != "none" and stage != 3:
            raise UserError(f'{path}: "zero_optimization.offload_param" needs stage 3, the config has {stage}')


def _fill(section: dict, key: str, value, where: str, option: str) -> None:
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value:
        raise UserError(
            f'{where}: "{key}" is {json.dumps(current)} but {option} gives {json.dumps(value)}; '
            f'set it to "auto" or change {option}'
        )


def resolve_ds_config(
    raw: dict,
    *,
    path: str,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bf16: bool,
    hidden_size: int,
) -> dict:
    check_ds_config(raw, path)
    cfg = copy.deepcopy(raw)
    if "scheduler" in cfg:
        raise UserError(
            f'{path}: "scheduler" must not be set: the schedule comes from --lr, --warmup-steps, '
            "--max-steps and --min-lr-ratio"
        )
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch, path, "--batch-size")
    _fill(cfg, "gradient_accumulation_steps", grad_accum, path, "--grad-accum")
    _fill(
        cfg, "train_batch_size", micro_batch * grad_accum * world_size, path, "--batch-size x --grad-accum x world size"
    )
    _fill(cfg, "gradient_clipping", grad_clip, path, "--grad-clip")
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", lr, f"{path}: optimizer.params", "--lr")
    _fill(params, "betas", list(betas), f"{path}: optimizer.params", "the trainer's betas")
    _fill(params, "eps", eps, f"{path}: optimizer.params", "the trainer's eps")
    _fill(params, "weight_decay", weight_decay, f"{path}: optimizer.params", "--weight-decay")
    _fill(cfg.setdefault("bf16", {}), "enabled", bf16, f"{path}: bf16", "the device (bf16 on CUDA, fp32 on CPU)")
    if cfg.get("fp16", {}).get("enabled") is True:
        raise UserError(f'{path}: fp16 is not supported; use bf16 ("bf16": {{"enabled": "auto"}})')
    zero = cfg.setdefault("zero_optimization", {})
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == AUTO:
            zero[key] = value
    leftover = _find_auto(cfg)
    if leftover:
        raise UserError(f'{path}: "{leftover}" is "auto" but nothing fills it; give a value')
    return cfg


def _find_auto(d, prefix: str = "") -> str | None:
    for k, v in d.items():
        name = f"{prefix}{k}"
        if v == AUTO:
            return name
        if isinstance(v, dict):
            found = _find_auto(v, name + ".")
            if found:
                return found
    return None


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
