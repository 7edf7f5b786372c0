"""One trainer for every stage and model: the stage supplies rows, a collate function and a loss
function; the engine (plain PyTorch or DeepSpeed) supplies backward/step. The trainer does the loop,
gradient accumulation, evaluation, logging, progress, checkpoints and exact resume, and writes the run's
summary.json at the end. What it needs from the model is `models.TrainableModel`.

The kernel backend (`--kernels`, TrainArgs.kernels) is in effect for everything the trainer runs the
model for (training, evaluation, `map_rows`), and the checkpoints record the one that ran.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import kernels
from models import IGNORE_INDEX, TrainableModel
from models.checkpoint import atomic_write
from models.flops import peak_flops, training_flops

from ..data.batches import BatchOrder, collate
from ..errors import UserError
from .checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import all_reduce_sum, all_reduce_sum_, dist_info, shutdown
from .interface import make_engine
from .metrics import MetricsLog, plot_losses
from .optim import OptimConfig

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


@dataclass
class TrainArgs:
    out: str
    max_steps: int = 200  # the schedule spans this many optimizer steps
    stop_after: int | None = None  # end this invocation at this step (checkpointed); resume later
    batch_size: int = 16  # rows per micro-batch per rank
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"
    progress: bool = True
    resume: bool = False
    deepspeed: str | None = None  # a DeepSpeed JSON config: train through a DeepSpeed engine
    expert_parallel_size: int = 1  # MoE: split the routed experts over groups of this many ranks
    kernels: str | None = None  # kernel backend for this run (None: the process's setting)
    max_nonfinite_steps: int = 0  # steps with a non-finite loss or gradient skipped before the run stops
    activation_checkpointing: int = 0  # recompute every k-th decoder layer's activations in the backward (0: off)
    compile: bool = False  # torch.compile each decoder layer


def pick_device(name: str) -> torch.device:
    """auto: this rank's GPU (LOCAL_RANK) when CUDA is there, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = f"cuda:{dist_info()[1]}"
        else:
            return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def target_tokens(batch: dict) -> float:
    """The default weight of a micro-batch: how many tokens it trains on."""
    return float((batch["targets"] != IGNORE_INDEX).sum())


class Trainer:
    def __init__(
        self,
        model: TrainableModel,
        train_set,
        loss_fn: LossFn,
        args: TrainArgs,
        optim: OptimConfig,
        *,
        eval_set=None,
        collate_fn=collate,
        weight_fn: Callable[[dict], float] = target_tokens,
        tokenizer_dir: Path | None = None,
        run_config: dict | None = None,
        title: str = "training loss",
        rows_per_step: int | None = None,
    ):
        if args.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {args.max_steps}")
        self.args, self.optim_cfg = args, optim
        self.optim_cfg.max_steps = args.max_steps
        self.optim_cfg.grad_accum = args.grad_accum
        self.rank, _, self.world_size = dist_info()
        self.is_main = self.rank == 0
        self.device = pick_device(args.device)
        self.out = Path(args.out)
        self.train_set, self.eval_set = train_set, eval_set
        self.loss_fn, self.collate_fn, self.weight_fn = loss_fn, collate_fn, weight_fn
        self.tokenizer_dir = tokenizer_dir
        self.run_config = run_config or {}
        self.title = title
        torch.manual_seed(args.seed)
        self.model = model.to(self.device)
        self.model.set_activation_checkpointing(args.activation_checkpointing)
        if args.compile:
            if self.world_size > 1:
                # Inductor's pool of compile worker processes can hang a distributed process at exit (seen
                # here: a 2-rank DDP run stalled after its last step; pytorch/pytorch#125235). Compiling in
                # the process itself avoids the pool; it costs only the first steps' compile time.
                import torch._inductor.config as inductor_config

                inductor_config.compile_threads = 1
            self.model.compile_layers()
        # MFU needs the device's peak: known GPUs only (models/flops.py), never a CPU
        self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.engine = make_engine(
            self.model, self.optim_cfg, self.device, args.deepspeed, args.batch_size, args.expert_parallel_size
        )
        # rows of train_set each rank draws per step: the micro-batch, or what a stage draws from (RL: prompts)
        per_rank = rows_per_step or args.batch_size
        self.order = BatchOrder(len(train_set), per_rank, args.seed, self.rank, self.world_size)
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0
        self.data_fingerprint = train_set.fingerprint()

    # ------------------------------------------------------------------ state

    def client_state(self) -> dict:
        """The trainer's own part of a checkpoint (the engine adds optimizer and schedule)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.order.state_dict(),
            "data_fingerprint": self.data_fingerprint,
            "rng": rng_state(),
        }

    def _resume(self) -> int | None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {self.out} (no '{self.out / 'latest'}' file)")
        state = self.engine.load_state(ckpt)
        saved = state.get("data_fingerprint")  # checkpoints written before fingerprints have none
        if saved is not None and saved != self.data_fingerprint:
            raise UserError(
                f"--resume: {ckpt} was trained on other data (fingerprint {saved}, this run's {self.data_fingerprint});"
                " resume with the data the run started with"
            )
        self.order.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        return self.step

    def save(self) -> Path:
        args = {
            "train": asdict(self.args),
            "optim": asdict(self.optim_cfg),
            "kernels": kernels.get_backend(),
            **self.run_config,
        }
        return save_checkpoint(
            self.out,
            self.step,
            self.engine,
            self.model.config,
            self.client_state(),
            args,
            self.tokenizer_dir,
            self.args.keep_checkpoints,
            self.is_main,
        )

    # ------------------------------------------------------------------ loop pieces

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _next_batch(self) -> dict:
        return self._to_device(self.collate_fn([self.train_set[i] for i in self.order.next_indices()]))

    def evaluate(self) -> dict:
        with kernels.use_backend(self.args.kernels):
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Mean loss (weighted like training) over the first eval_batches global batches of the held-out
        set, in a fixed order. Each rank takes its slice of every global batch, so the numbers equal a
        one-process run's with the same global batch."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        self.engine.train(False)
        bs = self.args.batch_size
        global_bs = bs * self.world_size
        n_rows = min(len(self.eval_set), self.args.eval_batches * global_bs)  # the same rows for any world size
        totals: dict[str, float] = {}
        n = 0.0
        for start in range(0, n_rows, global_bs):  # every rank runs every batch (ZeRO-3 needs that)
            lo = start + self.rank * bs
            idx = [i for i in range(lo, lo + bs) if i < n_rows]
            batch = self._to_device(self.collate_fn([self.eval_set[i] for i in idx or [0]]))
            with self._autocast():
                loss, stats = self.loss_fn(self.engine.module, batch)
            w = float(self.weight_fn(batch)) if idx else 0.0  # a rank past the end computes but does not count
            for k, v in {"loss": float(loss), **stats}.items():
                totals[k] = totals.get(k, 0.0) + v * w
            n += w
        self.engine.train(True)
        totals = all_reduce_sum({**totals, "_weight": n}, self.device)
        n = max(totals.pop("_weight"), 1e-12)
        out = {f"eval_{k}": v / n for k, v in totals.items()}
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
        return out

    def progress_postfix(self, rec: dict) -> dict[str, str]:
        """What the progress bar shows beside the step count."""
        postfix = dict(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if "mfu" in rec:
            postfix["mfu"] = f"{rec['mfu']:.1%}"
        return postfix

    def describe_eval(self, ev: dict) -> str:
        """The progress line of a held-out evaluation."""
        return f"held-out loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f})"

    @torch.no_grad()
    def map_rows(self, dataset, fn: Callable[[torch.nn.Module, dict], torch.Tensor], width: int):
        """fn(module, batch) -> [rows, width] for every row of `dataset`, in eval mode, with the model as
        it is now; rows are shared out across ranks (every rank runs the same number of batches, as
        ZeRO-3 requires) and the results gathered. Returns a float64 numpy array [len(dataset), width]."""
        with kernels.use_backend(self.args.kernels):
            return self._map_rows(dataset, fn, width)

    def _map_rows(self, dataset, fn, width: int):
        n, bs = len(dataset), self.args.batch_size
        out = torch.zeros(n, width, dtype=torch.float64, device=self.device)
        self.engine.train(False)
        for start in range(0, n, bs * self.world_size):
            idx = [start + self.rank * bs + j for j in range(bs)]
            batch = self._to_device(self.collate_fn([dataset[i % n] for i in idx]))
            with self._autocast():
                values = fn(self.engine.module, batch).to(torch.float64)
            for j, i in enumerate(idx):
                if i < n:
                    out[i] = values[j]
        self.engine.train(True)
        return all_reduce_sum_(out).cpu().numpy()

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches on every rank.

        Each micro-batch's mean loss is scaled by its share of the step's items (target tokens by
        default; `weight_fn`), counted over every micro-batch of every rank, so the gradient is that of
        the mean over the whole global batch, however the items fall between ranks and micro-batches
        (engines divide by world size and accumulation steps; the scale undoes that)."""
        accum, world = self.args.grad_accum, self.world_size
        t0 = time.perf_counter()
        batches = [self._next_batch() for _ in range(accum)]
        data_s = time.perf_counter() - t0  # reading rows, collating, copying to the device
        weights = [float(self.weight_fn(b)) for b in batches]
        total = max(all_reduce_sum({"w": sum(weights)}, self.device)["w"], 1e-12)
        sums: dict[str, float] = {}
        tokens, flops = 0, 0.0
        for batch, w in zip(batches, weights):
            with self._autocast():
                loss, stats = self.loss_fn(self.engine.module, batch)
            self.engine.backward(loss * (w * world * accum / total))
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v * w
            tokens += int(batch["input_ids"].numel())
            images = batch.get("pixel_values")
            rows, length = batch["input_ids"].shape[:2]
            flops += training_flops(self.model.config, rows, length, 0 if images is None else len(images))
        lr = self.engine.lr
        grad_norm = self.engine.step()
        model_stats = self.model.after_optimizer_step(all_reduce_sum_)  # the MoE model's expert-bias update
        self.step += 1
        self.tokens_seen += tokens * world
        means = {k: v / total for k, v in all_reduce_sum(sums, self.device).items()}
        step = {"lr": lr, "grad_norm": grad_norm, "tokens": tokens * world, "flops": flops * world, "data_s": data_s}
        return {**means, **model_stats, **step}

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to max_steps (or stop_after); write OUT/summary.json (the run's figures and the stage's
        run_config['run']); end a launcher-started run's process group. Returns the summary."""
        with kernels.use_backend(self.args.kernels):
            summary = {**self._fit(), **self.run_config.get("run", {}), "kernels": kernels.get_backend()}
        if self.is_main:
            text = json.dumps(summary, indent=2, default=str) + "\n"
            atomic_write(self.out / "summary.json", lambda tmp: tmp.write_text(text))
        shutdown()
        return summary

    def _kept(self) -> str:
        ckpt = latest_checkpoint(self.out)
        return f"the last checkpoint, {ckpt}, is kept" if ckpt is not None else "no checkpoint was saved"

    def _nonfinite_step(self, rec: dict, bar) -> None:
        """A step whose loss or gradient norm is not finite: with the PyTorch engine nothing was applied, and
        up to --max-nonfinite-steps of them are skipped; one more (or any under DeepSpeed, which has applied
        it) stops the run without saving, so no checkpoint ever holds non-finite weights."""
        self.nonfinite_steps += 1
        allowed = self.args.max_nonfinite_steps if self.engine.skips_nonfinite else 0
        if self.nonfinite_steps <= allowed:
            if self.is_main:
                bar.write(
                    f"step {self.step}: loss {rec['loss']}, gradient norm {rec['grad_norm']}: step skipped "
                    f"({self.nonfinite_steps} of at most {allowed})"
                )
            return
        bar.close()
        raise UserError(
            f"step {self.step}: the loss is {rec['loss']} and the gradient norm {rec['grad_norm']}: training "
            f"diverged; stopped without saving ({self._kept()}); try a lower --lr"
            + (" or a larger --max-nonfinite-steps" if self.engine.skips_nonfinite else "")
        )

    def _fit(self) -> dict:
        resumed = self._resume() if self.args.resume else None
        end = min(self.args.max_steps, self.args.stop_after or self.args.max_steps)
        log = MetricsLog(self.out / "metrics.jsonl", resume_step=resumed, enabled=self.is_main)
        self.engine.train(True)
        summary: dict = {"start_step": self.step}
        if resumed is None:
            first_eval = self.evaluate()
            if first_eval:
                log.write({"step": 0, **first_eval})
                summary["eval_before"] = first_eval
        bar = tqdm(
            total=self.args.max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.args.progress and self.is_main),
            desc=self.title,
        )
        t_start, tok_start = time.perf_counter(), self.tokens_seen
        rec: dict = {}
        while self.step < end:
            t0 = time.perf_counter()
            rec = self.train_step()
            dt = time.perf_counter() - t0
            rec = {"step": self.step, **rec, "step_s": dt, "tokens_per_s": rec["tokens"] / dt}
            rec["tokens_seen"] = self.tokens_seen
            rec["tflops_per_s"] = rec["flops"] / dt / 1e12  # model FLOPs (models/flops.py), every rank
            if self.peak_flops:
                rec["mfu"] = rec["flops"] / dt / (self.peak_flops * self.world_size)
            summary.setdefault("first_loss", rec["loss"])
            finite = math.isfinite(rec["loss"]) and (rec["grad_norm"] is None or math.isfinite(rec["grad_norm"]))
            if not finite:
                rec["nonfinite"] = True
            if self.step % self.args.log_every == 0 or self.step == end or not finite:
                log.write(rec)
            if not finite:
                self._nonfinite_step(rec, bar)  # raises unless the step may be skipped (nothing was applied)
            bar.set_postfix(**self.progress_postfix(rec))
            bar.update(1)
            if self.args.eval_every and (self.step % self.args.eval_every == 0 or self.step == end):
                ev = self.evaluate()
                bad = [k for k, v in ev.items() if not math.isfinite(v)]
                if bad:
                    bar.close()
                    name = "loss" if "eval_loss" in bad else bad[0].removeprefix("eval_")
                    raise UserError(
                        f"step {self.step}: the held-out {name} is {ev['eval_' + name]}: training diverged; "
                        f"stopped without saving ({self._kept()}); try a lower --lr"
                    )
                if ev:
                    log.write({"step": self.step, **ev})
                    summary["eval_after"] = ev
                    if self.is_main:
                        bar.write(f"step {self.step}: {self.describe_eval(ev)}")
            if self.step % self.args.save_every == 0 or self.step == end:
                summary["checkpoint"] = str(self.save())
        bar.close()
        elapsed = time.perf_counter() - t_start
        summary.update(
            end_step=self.step,
            last_loss=rec.get("loss"),
            seconds=elapsed,
            tokens_per_s=(self.tokens_seen - tok_start) / elapsed if elapsed > 0 else 0.0,
        )
        if self.is_main and (self.out / "metrics.jsonl").exists():
            summary["plot"] = str(plot_losses(self.out / "metrics.jsonl", self.out / "loss.png", self.title))
        return summary
