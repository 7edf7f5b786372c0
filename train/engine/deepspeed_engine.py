"""The DeepSpeed engine behind the trainer's engine interface (train/engine/interface.py).

ZeRO stage, offload and precision come from the JSON config (ds_configs/); run-dependent values are
filled from the trainer's arguments by train/engine/ds_config.py. The optimizer is DeepSpeed's (torch AdamW
via "torch_adam", or DeepSpeedCPUAdam when the optimizer state is offloaded) over our parameter
groups, and the schedule is the trainer's own warmup + cosine.

Checkpoints are DeepSpeed's own (`save_checkpoint`/`load_checkpoint`, every rank takes part) with the
trainer's state (step, data position, RNG) inside as client state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import UserError
from .distributed import dist_info, ensure_launcher_env
from .ds_config import load_ds_config, resolve_ds_config, zero_stage
from .optim import OptimConfig, param_groups, schedule


def _unlink_shm_buffer(device: torch.device) -> None:
    """Remove this rank's name for DeepSpeed's CPU shared-memory all-reduce buffer.

    On the CPU accelerator every rank creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (about 70 MB) and maps its peers' buffers, and DeepSpeed never unlinks them: each run would leave its
    buffers in /dev/shm (RAM) for good. Once every rank has mapped every buffer (init_distributed returns
    after that; the barrier makes sure all ranks are there), the names can go: the mappings stay valid
    until the processes exit, and the memory is freed then, however they exit.
    """
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if device.type != "cpu" or not (addr and port and dist.is_initialized()):
        return
    dist.barrier()
    name = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    name.unlink(missing_ok=True)


class DeepSpeedEngine:
    skips_nonfinite = False  # DeepSpeed applies every step (fp32/bf16): the trainer stops on a non-finite one

    def __init__(
        self, model: torch.nn.Module, cfg: OptimConfig, device: torch.device, config_path: str, micro_batch: int
    ):
        ensure_launcher_env()
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # DeepSpeed's info lines would drown the progress bar
        deepspeed.init_distributed()  # the accelerator's backend, as deepspeed.initialize would pick
        _unlink_shm_buffer(device)
        self.cfg = cfg
        world = dist_info()[2]
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.config = resolve_ds_config(
            load_ds_config(config_path),
            path=str(config_path),
            micro_batch=micro_batch,
            grad_accum=cfg.grad_accum,
            world_size=world,
            grad_clip=cfg.grad_clip,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            bf16=bf16,
            hidden_size=model.config.hidden_size,
        )
        self.stage = zero_stage(self.config)
        leaf = model.zero3_leaf_modules
        if self.stage == 3 and leaf:  # one gather per MoE block, so ranks agree even when an expert gets no tokens
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, list(leaf))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.weight_decay),
            config=self.config,
            lr_scheduler=schedule(cfg),
        )
        self.module = self.engine
        self.model = self.engine.module
        self._micro = 0

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed scales by 1/gradient_accumulation_steps itself and must see step() after every
        # micro-batch; it only updates at the accumulation boundary.
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.cfg.grad_accum:
            self.engine.step()

    def step(self) -> float | None:
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None  # None: not computed (no clipping)

    def save_state(self, ckpt_dir: Path, client_state: dict, is_main: bool) -> None:
        self.engine.save_checkpoint(
            str(ckpt_dir.parent), tag=ckpt_dir.name, client_state=client_state, save_latest=False
        )

    def load_state(self, ckpt_dir: Path) -> dict:
        path, client = self.engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        if path is None:
            raise UserError(f"{ckpt_dir}: not a DeepSpeed checkpoint (was this run trained without --deepspeed?)")
        return client

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, whole, on rank 0 (ZeRO-3 gathers one parameter at a time)."""
        if self.stage < 3:
            return self.model.state_dict()
        import deepspeed

        rank = dist_info()[0]
        state: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    state[name] = p.detach().clone().cpu()
        for name, b in self.model.named_buffers():
            if rank == 0 and name in self.model.state_dict():
                state[name] = b.detach().clone().cpu()
        return state

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def frozen(self, model: torch.nn.Module):
        """An inference-only engine for a second model (DPO's reference), partitioned like the trained
        one under ZeRO-3 so no rank ever holds all of it; plain replicas otherwise (DeepSpeed-Chat's
        scheme)."""
        import deepspeed

        model.requires_grad_(False)
        micro = self.config["train_micro_batch_size_per_gpu"]
        config = {
            "train_micro_batch_size_per_gpu": micro,
            "train_batch_size": micro * dist_info()[2],
            "bf16": {"enabled": self.config["bf16"]["enabled"]},
            "zero_optimization": {"stage": 3 if self.stage == 3 else 0},
        }
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
