"""The plain PyTorch engine (train/engine/interface.py): AdamW, the trainer's schedule, clipping;
DistributedDataParallel under a launcher; expert parallelism for the MoE model."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from models.checkpoint import WEIGHTS_FILE, load_state_strict, read_weights

from ..errors import UserError
from .distributed import dist_info, init_process_group
from .optim import OptimConfig, param_groups, schedule

STATE_FILE = "trainer_state.pt"


class TorchEngine:
    """AdamW + warmup/cosine + global-norm clipping; DistributedDataParallel when launched with
    several processes (torchrun or the deepspeed launcher without --deepspeed).

    With `expert_parallel_size` P > 1 (the MoE model), consecutive groups of P ranks split the routed
    experts between them (models/expert_parallel.py). DDP then all-reduces only the dense parameters;
    an expert's gradient already holds the contributions of every token its EP group routed to it, so
    it is summed over the ranks that hold the same expert (the expert-data-parallel group) and divided
    by the world size, which is DDP's mean. The clipping norm counts every expert once."""

    skips_nonfinite = True  # step() applies nothing when the gradient norm is not finite

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, device: torch.device, expert_parallel_size: int = 1):
        self.model, self.cfg = model, cfg
        self.module = model
        rank, _, world = dist_info()
        self.world = world
        self.ep_group = self.edp_group = None
        self.expert_params: dict[str, torch.nn.Parameter] = {}  # this rank's expert slices, by name
        if world > 1:
            init_process_group(device)
        if expert_parallel_size > 1:
            self._shard_experts(rank, world, expert_parallel_size)
        if world > 1:
            if self.expert_params:
                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, sorted(self.expert_params)
                )
            ids = [device.index] if device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        fused = all(p.is_cuda for p in model.parameters())
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            fused=fused or None,
        )
        self.scheduler = schedule(cfg)(self.optimizer)

    def _shard_experts(self, rank: int, world: int, ep: int) -> None:
        import torch.distributed as dist

        from models.expert_parallel import expert_parameter_names, shard_experts

        if not self.model.moe_blocks():
            raise UserError("--expert-parallel-size needs the MoE model")
        if world % ep:
            raise UserError(f"--expert-parallel-size {ep} must divide the number of ranks ({world})")
        n_experts = self.model.config.n_routed_experts
        if n_experts % ep:
            raise UserError(f"--expert-parallel-size {ep} must divide n_routed_experts ({n_experts})")
        for k in range(world // ep):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(k * ep, (k + 1) * ep)))
            if rank // ep == k:
                self.ep_group = g
        for j in range(ep):
            g = dist.new_group(list(range(j, world, ep)))
            if rank % ep == j:
                self.edp_group = g
        shard_experts(self.model, self.ep_group, rank % ep, ep)
        params = dict(self.model.named_parameters())
        self.expert_params = {name: params[name] for name in expert_parameter_names(self.model)}

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def _reduce_expert_grads(self) -> float:
        """Expert gradients to DDP's convention; returns the squared norm of all of them (every expert once)."""
        import torch.distributed as dist

        sq = torch.zeros((), dtype=torch.float64)
        for p in self.expert_params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if dist.get_world_size(self.edp_group) > 1:
                dist.all_reduce(p.grad, group=self.edp_group)
            p.grad /= self.world
            sq += p.grad.double().pow(2).sum().cpu()
        dist.all_reduce(sq, group=self.ep_group)
        return float(sq)

    def step(self) -> float:
        """Clip and apply the gradients; returns their norm. A non-finite norm (the same on every rank: the
        gradients are reduced first) applies nothing: the optimizer state and weights stay as they were."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.ep_group is not None:
            expert_sq = self._reduce_expert_grads()
            expert_ids = {id(p) for p in self.expert_params.values()}
            dense = [p.grad for p in params if p.grad is not None and id(p) not in expert_ids]
            dense_sq = float(sum(g.double().pow(2).sum() for g in dense)) if dense else 0.0
            norm = math.sqrt(dense_sq + expert_sq)
            if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(self.cfg.grad_clip / (norm + 1e-6))
        elif self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if math.isfinite(float(norm)):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _state_file(self) -> str:
        # under expert parallelism each rank's optimizer holds different experts' moments
        return f"trainer_state_rank{dist_info()[0]}.pt" if self.ep_group is not None else STATE_FILE

    def save_state(self, ckpt_dir: Path, client_state: dict, is_main: bool) -> None:
        if is_main or self.ep_group is not None:  # every rank holds the same optimizer state under plain DDP
            state = {
                **client_state,
                "engine": {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            }
            torch.save(state, ckpt_dir / self._state_file())

    def load_state(self, ckpt_dir: Path) -> dict:
        weights = read_weights(ckpt_dir / WEIGHTS_FILE)
        if self.ep_group is not None:  # this rank's slice of every expert tensor
            for name, p in self.expert_params.items():
                offset = self.model.get_submodule(name.rsplit(".", 1)[0]).offset
                weights[name] = weights[name][offset : offset + p.shape[0]]
        load_state_strict(self.model, weights, str(ckpt_dir))
        path = ckpt_dir / self._state_file()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(
                f"{ckpt_dir}: no {path.name} (was this run trained with --deepspeed, or with "
                "another --expert-parallel-size?)"
            ) from None
        except Exception as e:  # noqa: BLE001 - any unreadable state file is the same user-facing error
            raise UserError(f"{path}: cannot read the trainer state ({e})") from None
        self.optimizer.load_state_dict(state["engine"]["optimizer"])
        self.scheduler.load_state_dict(state["engine"]["scheduler"])
        return state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if self.ep_group is not None:  # every rank takes part in gathering the expert slices
            from models.expert_parallel import gather_experts

            state = gather_experts(self.model, dict(state), self.ep_group)
        return state

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """An inference-only copy living beside the trained model (DPO's reference)."""
        return model.to(next(self.model.parameters()).device).eval().requires_grad_(False)
