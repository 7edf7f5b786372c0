"""Reinforcement learning with verifiable rewards: GRPO, Dr. GRPO and DAPO (losses in train/losses.py).

    llm-scratch grpo --init DPO_RUN --data prompts.jsonl --out DIR [--group-size 8] [--variant grpo]
    python -m train.grpo ... ; deepspeed --module train.grpo --deepspeed ds_configs/zero2.json ...

Prompts carry their answer: {"messages": [...], "answer": "..."} (`llm-scratch data` writes rl_train.jsonl;
VLM records carry "images" too). Each rollout takes --prompts-per-step prompts (shared out over the ranks)
and samples a group of --group-size completions of each at --temperature, in think mode, batched with the
KV cache. The rewards (train/rewards.py; --reward) of a group give its advantages; then --inner-steps
optimizer steps over those completions minimise PPO's clipped objective, the completions split into
micro-batches of --batch-size rows (so one step accumulates prompts x group / (ranks x batch size) of them).

The ratio's "old" log-probs are those of the policy that sampled (computed once per rollout when
--inner-steps > 1; with one inner step the ratio is 1 and only its gradient counts). The log-probs are
the policy's own (temperature 1), as in the other stages: sampling at another temperature makes the
samples slightly off-policy. The starting policy is kept as the reference: the k3 estimate of
KL(policy || reference) is logged every step and added to the loss with --kl-beta.

Each completion's random numbers come from (seed, rollout, the prompt's place in the global batch,
sample number) (models/generate.py, `uniforms`), so a rollout is the same on one rank or many, and a
run resumed from a checkpoint regenerates exactly the rollout it would have made: checkpoints fall on
rollout boundaries (--save-every and --stop-after multiples of --inner-steps).

Held-out evaluation: greedy exact match on --eval-records prompts of --eval-data (or the last
--eval-fraction of --data).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch

import kernels
from models import IGNORE_INDEX
from models.chat_format import PAD, STOP_TOKENS
from models.generate import generate

from .args import add_train_args, train_args_from
from .data.batches import fingerprint
from .data.chat_masks import encode_prompt
from .data.finetune import pad_collate
from .data.images import image_inputs
from .engine.distributed import all_reduce_sum, dist_info
from .engine.ds_config import load_ds_config, zero_stage
from .engine.trainer import Trainer
from .errors import UserError, run_guarded
from .evaluate import exact_match, load_eval_records
from .finetune import add_start_args, add_vlm_data_args, freeze_except, held_out_count
from .losses import GRPO_VARIANTS, grpo_advantages, grpo_loss, grpo_weight, token_logps
from .rewards import DEFAULT_REWARDS, exact_answer, load_reward, score
from .run_dir import RunDir

MAX_DRAWS = 8  # rollouts drawn for one step before giving up when all their groups are dropped (dapo)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m train.grpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = p.add_argument_group("data")
    add_start_args(d)
    d.add_argument("--data", nargs="+", required=True, metavar="PATH", help="prompt files (.jsonl) with answers")
    d.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out prompts (default: a slice of --data)")
    d.add_argument("--eval-fraction", type=float, default=0.02, help="prompts held out when no --eval-data")
    d.add_argument("--eval-records", type=int, default=200, help="held-out prompts each evaluation answers")
    add_vlm_data_args(d)
    g = p.add_argument_group("GRPO")
    g.add_argument("--variant", choices=GRPO_VARIANTS, default="grpo", help="see train/losses.py")
    g.add_argument("--group-size", type=int, default=8, help="completions sampled per prompt (G)")
    g.add_argument("--prompts-per-step", type=int, default=8, help="prompts per rollout, over all ranks")
    g.add_argument("--inner-steps", type=int, default=1, help="optimizer steps per rollout (mu)")
    g.add_argument("--max-new-tokens", type=int, default=320, help="longest completion; longer ones are cut")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    g.add_argument("--clip-low", type=float, default=0.2, help="the ratio's lower clip, 1 - eps_low")
    g.add_argument("--clip-high", type=float, help="the upper clip, 1 + eps_high (default 0.28 for dapo, else 0.2)")
    g.add_argument("--kl-beta", type=float, default=0.0, help="weight of the KL to the starting policy in the loss")
    g.add_argument(
        "--reward",
        nargs="+",
        default=list(DEFAULT_REWARDS),
        metavar="NAME=W",
        help="rewards and weights: built in exact, format; or MODULE:FUNCTION=W (train/rewards.py)",
    )
    g.add_argument("--generation-batch-size", type=int, default=0, help="rows per generate call (0: all at once)")
    add_train_args(p, steps=100, lr=1e-5, batch_size=16)
    p.set_defaults(warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0)
    return p


def check_options(ns: argparse.Namespace) -> None:
    if ns.clip_high is None:
        ns.clip_high = 0.28 if ns.variant == "dapo" else 0.2
    for name in ("group_size", "prompts_per_step", "inner_steps", "max_new_tokens"):
        if getattr(ns, name) < (2 if name == "group_size" else 1):
            least = 2 if name == "group_size" else 1
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(ns, name)}")
    if not math.isfinite(ns.temperature) or ns.temperature <= 0:
        raise UserError(f"--temperature must be positive (GRPO samples), got {ns.temperature}")
    for name in ("clip_low", "clip_high", "kl_beta"):
        v = getattr(ns, name)
        if not math.isfinite(v) or v < 0 or (name == "clip_low" and v >= 1):
            raise UserError(f"--{name.replace('_', '-')} must be {'in [0, 1)' if name == 'clip_low' else '>= 0'}")
    if ns.eval_records < 0 or ns.generation_batch_size < 0:
        raise UserError("--eval-records and --generation-batch-size must not be negative")
    if ns.grad_accum != 1:
        raise UserError("--grad-accum follows from the rollout: prompts x group / (ranks x --batch-size)")
    mu = ns.inner_steps
    if ns.save_every % mu or (ns.stop_after is not None and ns.stop_after % mu):
        raise UserError(
            f"--save-every and --stop-after must be multiples of --inner-steps ({mu}): a checkpoint "
            "falls on a rollout boundary"
        )
    if ns.expert_parallel_size > 1:
        raise UserError("GRPO generates on every rank with the whole model: --expert-parallel-size is not supported")
    if ns.deepspeed and zero_stage(load_ds_config(ns.deepspeed)) == 3:
        raise UserError("GRPO generates on every rank with the whole model: use ZeRO-1 or ZeRO-2, not ZeRO-3")


class PromptSet:
    """The prompts (token ids, rendered in think mode) with their answers and images; rows of the
    trainer's data order."""

    def __init__(self, records, tokenizer, image_tokens: int, context: int):
        self.records, self.ids, self.dropped = [], [], 0
        for r in records:
            ids = encode_prompt(tokenizer, r.prompt, True, image_tokens)
            if len(ids) >= context:  # no room for one new token
                self.dropped += 1
                continue
            self.records.append(r)
            self.ids.append(ids)

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        return fingerprint([np.asarray(x, dtype=np.int64) for x in self.ids], [r.answer for r in self.records])


class GRPOObjective:
    """The trainer's loss function: the clipped objective of a micro-batch of completions."""

    def __init__(self, ns: argparse.Namespace):
        self.variant, self.clip_low, self.clip_high = ns.variant, ns.clip_low, ns.clip_high
        self.beta, self.max_new_tokens = ns.kl_beta, ns.max_new_tokens

    @staticmethod
    def mask(batch: dict) -> torch.Tensor:
        """True at the completion tokens of the kept completions (never a prompt or padding position)."""
        return (batch["targets"] != IGNORE_INDEX) & batch["keep"][:, None]

    def weight(self, batch: dict) -> float:
        return grpo_weight(self.variant, self.mask(batch))

    def __call__(self, module, batch: dict):
        return grpo_loss(
            token_logps(module, batch),
            batch["advantages"],
            self.mask(batch),
            self.variant,
            batch.get("old_logps"),
            self.clip_low,
            self.clip_high,
            batch.get("ref_logps"),
            self.beta,
            self.max_new_tokens,
        )


def completion_rows(prompt: list[int], new: list[int]) -> dict[str, torch.Tensor]:
    """A training row: inputs are (prompt + completion)[:-1]; the target at t is token t+1 where that is a
    completion token, ignored over the prompt."""
    ids = torch.tensor(prompt + new, dtype=torch.long)
    targets = ids[1:].clone()
    targets[: len(prompt) - 1] = IGNORE_INDEX
    return {"input_ids": ids[:-1], "targets": targets}


def sample_uniforms(seed: int, rollout: int, slot: int, sample: int, n: int) -> torch.Tensor:
    """A completion's n random numbers, from its seed, rollout, global prompt slot and sample number."""
    state = np.random.SeedSequence([seed, rollout, slot, sample]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.rand(n, generator=g, dtype=torch.float64)


class GRPOTrainer(Trainer):
    """The trainer with rollouts: every --inner-steps steps it samples, rewards and builds the micro-batches
    the next steps train on; its evaluation is greedy exact match."""

    def __init__(self, model, prompts: PromptSet, ns, targs, optim, *, tokenizer, eval_prompts, prompts_per_rank, **kw):
        self.ns, self.prompts, self.eval_prompts, self.tok = ns, prompts, eval_prompts, tokenizer
        self.objective = GRPOObjective(ns)
        self.rewards = [load_reward(s) for s in ns.reward]
        self.stop = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        self.pad = tokenizer.convert_tokens_to_ids(PAD)
        self.collate_rows = pad_collate(self.pad)
        reference = copy.deepcopy(model).requires_grad_(False)
        super().__init__(
            model,
            prompts,
            self.objective,
            targs,
            optim,
            weight_fn=self.objective.weight,
            rows_per_step=prompts_per_rank,
            **kw,
        )
        self.reference = self.engine.frozen(reference)
        _, self.loader = image_inputs(model)
        self.batches: list[dict] = []  # the current rollout's micro-batches (none yet after a start or resume)
        self.rollout_stats: dict = {}

    # ---------------------------------------------------------------- rollouts

    def train_step(self) -> dict:
        mu = self.ns.inner_steps
        if self.step % mu == 0 or not self.batches:
            if self.step % mu:
                raise UserError(f"cannot continue at step {self.step}, inside a rollout of {mu} inner steps")
            t0 = time.perf_counter()
            for attempt in range(MAX_DRAWS):  # dapo: a rollout whose every group was dropped is drawn again
                self._rollout(self.step // mu * MAX_DRAWS + attempt)
                if self.rollout_stats["groups_kept"] > 0:
                    break
            else:
                raise UserError(
                    f"step {self.step}: {MAX_DRAWS} rollouts in a row gave every completion of each prompt the "
                    "same reward; nothing to learn from (try a higher --temperature or other prompts)"
                )
            self.rollout_stats["rollout_s"] = time.perf_counter() - t0
            self.rollout_stats["draws"] = attempt + 1
        self._queue = iter(self.batches)
        return {**super().train_step(), **self.rollout_stats}

    def _next_batch(self) -> dict:
        return next(self._queue)

    @torch.no_grad()
    def _rollout(self, index: int) -> None:
        ns, G = self.ns, self.ns.group_size
        idx = self.order.next_indices()
        slot0 = self.rank * len(idx)
        prompts = [self.prompts.ids[i] for i in idx for _ in range(G)]
        slots = [(slot0 + k, j) for k in range(len(idx)) for j in range(G)]
        uniforms = torch.stack([sample_uniforms(ns.seed, index, k, j, ns.max_new_tokens) for k, j in slots])
        chunk = ns.generation_batch_size or len(prompts)
        news, entropies = [], []
        with kernels.use_backend(self.args.kernels), self._autocast():
            for lo in range(0, len(prompts), chunk):
                rows = range(lo, min(lo + chunk, len(prompts)))
                pixels = self._pixels([idx[i // G] for i in rows])
                steps: list[torch.Tensor] = []
                out = generate(
                    self.model,
                    [prompts[i] for i in rows],
                    ns.max_new_tokens,
                    temperature=ns.temperature,
                    stop_ids=self.stop,
                    pad_id=self.pad,
                    pixel_values=pixels,
                    uniforms=uniforms[lo : lo + len(rows)],
                    on_logits=lambda logits, steps=steps: steps.append(_entropy(logits)),
                )
                per_step = torch.stack(steps, 1) if steps else torch.zeros(len(rows), 0)
                for k, new in enumerate(out):
                    news.append(new)
                    entropies.append(float(per_step[k, : len(new)].mean()) if new else 0.0)
        rewards, correct, finished = [], [], []
        parts = {f"reward_{r.name}": 0.0 for r in self.rewards}
        for i, new in enumerate(news):
            record = self.prompts.records[idx[i // G]]
            done = bool(new) and new[-1] in self.stop
            text = self.tok.decode(new, skip_special_tokens=True)
            total, each = score(self.rewards, text, record.answer, done, record.where)
            rewards.append(total)
            for name, v in each.items():
                parts[f"reward_{name}"] += v
            correct.append(exact_answer(text, record.answer, done))
            finished.append(done)
        r = torch.tensor(rewards, dtype=torch.float64).view(len(idx), G)
        adv = grpo_advantages(r, ns.variant).view(-1)
        keep = torch.ones(len(idx), G, dtype=torch.bool)
        if ns.variant == "dapo":  # groups whose rewards are all equal teach nothing: dropped
            keep = (r != r[:, :1]).any(-1, keepdim=True).expand(-1, G)
        keep = keep.reshape(-1)
        self.batches = self._micro_batches(prompts, news, adv, keep, idx)
        lengths = [len(n) for n in news]
        sums = {
            "reward": sum(rewards),
            "accuracy": sum(correct),
            "response_length": sum(lengths),
            "truncated": len(news) - sum(finished),
            "entropy": sum(e * n for e, n in zip(entropies, lengths)),
            "groups_kept": float(keep.view(len(idx), G)[:, 0].sum()),
            **parts,
            "_samples": len(news),
            "_groups": len(idx),
            "_tokens": sum(lengths),
        }
        total = all_reduce_sum(sums, self.device)
        n, groups, tokens = total.pop("_samples"), total.pop("_groups"), max(total.pop("_tokens"), 1)
        self.rollout_stats = {
            "reward": total["reward"] / n,
            "accuracy": total["accuracy"] / n,
            "response_length": total["response_length"] / n,
            "truncated": total["truncated"] / n,
            "entropy": total["entropy"] / tokens,
            "groups_kept": total["groups_kept"] / groups,
            **{k: total[k] / n for k in parts},
        }

    def _pixels(self, prompt_indices: list[int]) -> torch.Tensor | None:
        if self.loader is None:
            return None
        return self.loader([p for i in prompt_indices for p in self.prompts.records[i].images])

    def _micro_batches(self, prompts, news, adv, keep, idx) -> list[dict]:
        """The rollout's completions in --grad-accum micro-batches of at most --batch-size rows, on the device,
        with the sampling policy's log-probs (when inner steps reuse them) and the reference's."""
        G, bs = self.ns.group_size, self.args.batch_size
        batches = []
        for lo in range(0, len(news), bs):
            rows = range(lo, min(lo + bs, len(news)))
            batch = self.collate_rows([completion_rows(prompts[i], news[i]) for i in rows])
            batch["advantages"] = adv[lo : rows.stop].float()
            batch["keep"] = keep[lo : rows.stop]
            pixels = self._pixels([idx[i // G] for i in rows])
            if pixels is not None:
                batch["pixel_values"] = pixels
            batch = self._to_device(batch)
            with kernels.use_backend(self.args.kernels), self._autocast():
                if self.ns.inner_steps > 1:
                    batch["old_logps"] = self._logps(self.model, batch)
                batch["ref_logps"] = self._logps(self.reference, batch)
            batches.append(batch)
        if len(batches) != self.args.grad_accum:
            raise RuntimeError(f"{len(batches)} micro-batches, expected {self.args.grad_accum}")
        return batches

    @staticmethod
    def _logps(model, batch: dict) -> torch.Tensor:
        was = model.training
        model.eval()
        out = token_logps(model, batch).float()
        model.train(was)
        return out

    def progress_postfix(self, rec: dict) -> dict[str, str]:
        return dict(
            reward=f"{rec['reward']:.3f}",
            acc=f"{rec['accuracy']:.1%}",
            len=f"{rec['response_length']:.0f}",
            kl=f"{rec['kl']:.4f}",
            samples_s=f"{self.ns.prompts_per_step * self.ns.group_size / rec['step_s']:.1f}",
        )

    # ---------------------------------------------------------------- evaluation

    def evaluate(self) -> dict:
        if not self.eval_prompts or not self.args.eval_every:
            return {}
        with kernels.use_backend(self.args.kernels), torch.no_grad(), self._autocast():
            mine = self.eval_prompts[self.rank :: self.world_size]
            res = (
                exact_match(self.model, self.tok, mine, think=True, max_new_tokens=self.ns.max_new_tokens)
                if mine
                else {"correct": 0, "total": 0}
            )
        total = all_reduce_sum({"correct": res["correct"], "total": res["total"]}, self.device)
        return {"eval_accuracy": total["correct"] / max(total["total"], 1), "eval_records": total["total"]}

    def describe_eval(self, ev: dict) -> str:
        n = int(ev["eval_records"])
        return f"held-out exact match {ev['eval_accuracy']:.1%} ({round(ev['eval_accuracy'] * n)}/{n}, greedy)"


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the policy's next-token distribution (temperature 1), per row."""
    p = torch.softmax(logits.float(), -1)
    return -torch.special.xlogy(p, p).sum(-1).cpu()  # 0 log 0 = 0 (a banned token's -inf logit)


def run(ns: argparse.Namespace) -> dict:
    check_options(ns)
    targs, optim = train_args_from(ns)
    with RunDir(ns.out, ns.resume, ns.tokenizer, ns.init) as run_dir:
        return _train(ns, targs, optim, run_dir)


def _train(ns: argparse.Namespace, targs, optim, run_dir: RunDir) -> dict:
    world = dist_info()[2]
    if ns.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {ns.prompts_per_step} must be a multiple of the ranks ({world})")
    tok = run_dir.tokenizer
    model = run_dir.starting_model(ns.seed)
    if run_dir.resume_ckpt is not None:  # the reference is the starting policy: read it again from --init
        if not ns.init:
            raise UserError("--resume: give --init too (the starting policy is the KL reference)")
        from models import load_pretrained

        start = load_pretrained(ns.init)
        model.load_state_dict(start.state_dict())
    trainable = freeze_except(model, ns.train)
    image_tokens, _ = image_inputs(model)
    context = model.config.max_position_embeddings
    records = [r for path in ns.data for r in load_eval_records(path, ns.images_anywhere)]
    if ns.eval_data:
        eval_records = [r for path in ns.eval_data for r in load_eval_records(path, ns.images_anywhere)]
    else:
        n_eval = held_out_count(len(records), ns.eval_fraction if ns.eval_every else 0)
        records, eval_records = records[: len(records) - n_eval], records[len(records) - n_eval :]
    prompts = PromptSet(records, tok, image_tokens, context)
    held = PromptSet(eval_records[: ns.eval_records], tok, image_tokens, context)
    rows = ns.prompts_per_step // world * ns.group_size
    targs.grad_accum = optim.grad_accum = -(-rows // ns.batch_size)
    info = {
        "stage": "grpo",
        "init": ns.init,
        "trainable_parameters": trainable,
        "train": ns.train,
        "prompts": len(prompts),
        "held_out_prompts": len(held),
        "dropped_too_long": prompts.dropped + held.dropped,
        "variant": ns.variant,
        "group_size": ns.group_size,
        "prompts_per_step": ns.prompts_per_step,
        "inner_steps": ns.inner_steps,
        "clip": [ns.clip_low, ns.clip_high],
        "kl_beta": ns.kl_beta,
        "temperature": ns.temperature,
        "rewards": ns.reward,
    }
    trainer = GRPOTrainer(
        model,
        prompts,
        ns,
        targs,
        optim,
        tokenizer=tok,
        eval_prompts=held.records,
        prompts_per_rank=ns.prompts_per_step // world,
        tokenizer_dir=run_dir.tokenizer_dir,
        run_config={"run": info},
        title="grpo",
    )
    if trainer.is_main:
        print(
            f"grpo ({ns.variant}): {len(prompts)} prompts, {len(held)} held out; {ns.prompts_per_step} prompts x "
            f"{ns.group_size} samples per rollout, {ns.inner_steps} inner step(s), {targs.grad_accum} micro-batches "
            f"of <= {ns.batch_size} per rank; rewards {' '.join(ns.reward)}; device {trainer.device}, out {ns.out}",
            flush=True,
        )
    return trainer.fit()


def main(argv: list[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_guarded(main)
