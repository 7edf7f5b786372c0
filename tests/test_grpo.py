"""The RL stage (train/grpo.py): the GRPO / Dr. GRPO / DAPO losses against values computed by hand,
advantages, the masks, the answer parser and rewards, sampling that does not depend on the batch, and
runs: metrics, exact resume, a VLM, bad rewards."""

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from models import IGNORE_INDEX
from train.data.finetune import pad_collate
from train.errors import UserError
from train.grpo import completion_rows
from train.grpo import main as grpo_main
from train.losses import grpo_advantages, grpo_loss, grpo_weight
from train.rewards import exact_answer, load_reward, parse_answer, score, well_formed

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- advantages and losses by hand


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    std = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1): squares 4 * 0.25 over n - 1 = 3
    a = grpo_advantages(r, "grpo")
    h = 0.5 / (std + 1e-4)
    assert a[0].tolist() == pytest.approx([h, -h, -h, h])
    assert a[1].tolist() == [0.0] * 4  # equal rewards: no signal
    std2 = math.sqrt(2 / 3)
    assert a[2].tolist() == pytest.approx([1 / (std2 + 1e-4), -1 / (std2 + 1e-4), 0.0, 0.0])
    assert grpo_advantages(r, "dapo").tolist() == a.tolist()
    dr = grpo_advantages(r, "dr_grpo")
    assert dr.flatten().tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0])
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(3, 1), "grpo")


def _hand_loss(logps, old, ref, adv, mask, variant, lo, hi, beta, max_new):
    """The formulas of train/losses.py, one token at a time."""
    per_seq, total, n_tok, n_seq = [], 0.0, 0, 0
    for i in range(len(logps)):
        s, k = 0.0, 0
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logps[i][t] - old[i][t])
            term = -min(rho * adv[i], min(max(rho, 1 - lo), 1 + hi) * adv[i])
            d = ref[i][t] - logps[i][t]
            term += beta * (math.exp(d) - d - 1)
            s, k = s + term, k + 1
        if k:
            per_seq.append(s / k)
            n_seq += 1
        total, n_tok = total + s, n_tok + k
    if variant == "grpo":
        return sum(per_seq) / n_seq
    if variant == "dapo":
        return total / n_tok
    return total / (n_seq * max_new)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_matches_hand_computed_values(variant, beta):
    logps = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -0.2, -9.0, -9.0], [-1.5, -1.0, -0.7, -2.2]]
    # clipped: token (0, 0) (ratio e^0.5 above 1.28 with A > 0) and (1, 0) (e^-0.5 below 0.8 with A < 0)
    old = [[-1.5, -0.5, -1.5, -0.1], [0.2, -0.9, -9.0, -9.0], [-1.5, -1.1, -0.2, -2.0]]
    ref = [[-1.1, -0.6, -1.9, -0.2], [-0.4, -0.3, -9.0, -9.0], [-1.4, -0.8, -0.9, -2.1]]
    mask = [[True, True, True, False], [True, True, False, False], [True, True, True, True]]
    adv = [1.3, -0.7, 0.4]
    lo, hi = 0.2, 0.28
    lp = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(
        lp,
        torch.tensor(adv, dtype=torch.float64),
        torch.tensor(mask),
        variant,
        torch.tensor(old, dtype=torch.float64),
        lo,
        hi,
        torch.tensor(ref, dtype=torch.float64),
        beta,
        max_new_tokens=6,
    )
    want = _hand_loss(logps, old, ref, adv, mask, variant, lo, hi, beta, 6)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    g = lp.grad
    assert torch.all(g[~torch.tensor(mask)] == 0)  # masked tokens get no gradient
    clipped = [
        [
            min(max(math.exp(a - b), 1 - lo), 1 + hi) * adv[i] < math.exp(a - b) * adv[i]
            for a, b in zip(logps[i], old[i])
        ]
        for i in range(3)
    ]
    on = [[c for c, m in zip(clipped[i], mask[i]) if m] for i in range(3)]
    if variant == "dapo":  # statistics are averaged like the loss: over tokens, or over completions
        want_fraction = sum(map(sum, on)) / sum(map(len, on))
    else:
        want_fraction = sum(sum(row) / len(row) for row in on) / 3
    assert stats["clip_fraction"] == pytest.approx(want_fraction)
    assert 0 < want_fraction < 1
    assert "kl" in stats


def test_clipped_tokens_have_no_policy_gradient():
    """rho = e^0.5 > 1 + eps with A > 0: the clipped term is the smaller one, a constant: zero gradient;
    below 1 - eps with A < 0 the same. Inside the range the gradient is -A * rho / n."""
    lp = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(lp, adv, torch.ones(2, 2, dtype=torch.bool), "dapo", old, 0.2, 0.2)
    loss.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[1, 0] == 0
    assert lp.grad[0, 1].item() == pytest.approx(-1 / 4) and lp.grad[1, 1].item() == pytest.approx(1 / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_one_inner_step_is_the_policy_gradient():
    """With no old log-probs the ratio is 1 and the gradient is -A / (tokens of the sequence) / sequences."""
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, _ = grpo_loss(lp, torch.tensor([2.0, -1.0]), mask, "grpo")
    assert loss.item() == pytest.approx(-(2.0 + -1.0) / 2)
    loss.backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-2 / 3 / 2] * 3 + [1 / 2, 0, 0])


def test_weights_make_micro_batches_one_global_mean():
    """Two micro-batches weighted by grpo_weight give the loss of the whole batch, for every variant."""
    torch.manual_seed(0)
    lp = torch.randn(6, 5, dtype=torch.float64)
    adv = torch.randn(6, dtype=torch.float64)
    mask = torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    mask[4] = False  # a dropped completion
    for variant in ("grpo", "dr_grpo", "dapo"):
        whole, _ = grpo_loss(lp, adv, mask, variant, lp - 0.1, max_new_tokens=5)
        parts = []
        for s in (slice(0, 2), slice(2, 6)):
            part, _ = grpo_loss(lp[s], adv[s], mask[s], variant, lp[s] - 0.1, max_new_tokens=5)
            parts.append((part, grpo_weight(variant, mask[s])))
        total = sum(w for _, w in parts)
        combined = sum(part * w / total for part, w in parts)
        assert combined.item() == pytest.approx(whole.item(), rel=1e-12), variant


def test_prompt_and_padding_tokens_never_reach_the_loss():
    rows = [completion_rows([5, 6, 7, 8], [9, 10, 2]), completion_rows([5, 6], [11, 2])]
    batch = pad_collate(0)(rows)
    t = batch["targets"]
    assert t[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9, 10, 2]
    assert t[1].tolist() == [IGNORE_INDEX, 11, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    mask = t != IGNORE_INDEX
    lp = torch.randn(t.shape, requires_grad=True)
    for variant in ("grpo", "dr_grpo", "dapo"):
        loss, _ = grpo_loss(lp, torch.tensor([1.0, -0.5]), mask, variant, lp.detach() + 0.05)
        (g,) = torch.autograd.grad(loss, lp)
        assert torch.all(g[~mask] == 0) and torch.all(g[mask] != 0)
        noisy = lp.detach().clone()
        noisy[~mask] = 1e6  # whatever the model says at prompt and padding positions
        again, _ = grpo_loss(noisy, torch.tensor([1.0, -0.5]), mask, variant, lp.detach() + 0.05)
        assert again.item() == pytest.approx(loss.item())


# ---------------------------------------------------------------- the answer parser and rewards


@pytest.mark.parametrize(
    "text,answer",
    [
        ("<think>\n3 + 4 = 7\n</think>\n\n3 + 4 = 7", "3 + 4 = 7"),
        ("<think>x</think>  42  ", "42"),
        ("<think>\nno end", None),  # never closed
        ("3 + 4 = 7", None),  # no think block at all
        ("<think>a</think>\n\n", None),  # nothing after it
        ("<think>a</think>b</think>c", None),  # two closings
        ("<think>a<think>b</think>c", None),  # two openings
        ("", None),
    ],
)
def test_answer_parser_on_malformed_outputs(text, answer):
    assert parse_answer(text) == answer


def test_answer_parser_thinking_off():
    assert parse_answer("  12 ", thinking=False) == "12"
    assert parse_answer("<think>x</think>12", thinking=False) is None
    assert parse_answer("", thinking=False) is None


def test_builtin_rewards():
    good = "<think>\nsteps\n</think>\n\n1 + 2 = 3"
    assert exact_answer(good, "1 + 2 = 3", True) == 1.0 and exact_answer(good, "1 + 2 = 4", True) == 0.0
    assert well_formed(good, "", True) == 1.0
    assert well_formed(good, "", False) == 0.0  # cut at the token budget
    assert well_formed("steps</think>1", "", True) == 0.0  # not opened
    assert well_formed("<think>a</think>\n1\nmore", "", True) == 0.0  # text after the answer line
    total, each = score([load_reward("exact=1"), load_reward("format=0.25")], good, "1 + 2 = 3", True, "f:1")
    assert total == 1.25 and each == {"exact": 1.0, "format": 1.0}


def test_reward_specs():
    assert load_reward("exact").weight == 1.0
    r = load_reward("math:sqrt=0.5")
    assert r.fn is math.sqrt and r.weight == 0.5
    for spec, needle in [
        ("nope=1", "unknown reward"),
        ("exact=x", "not a number"),
        ("math:nothing", "cannot import"),
        ("no_such_module_xyz:f", "cannot import"),
        ("exact=inf", "finite"),
    ]:
        with pytest.raises(UserError, match=needle):
            load_reward(spec)


@pytest.mark.parametrize(
    "body,needle",
    [
        ("return float('nan')", "returned nan"),
        ("raise KeyError('boom')", "raised KeyError"),
        ("return 'high'", "not a number"),
    ],
)
def test_a_bad_reward_is_one_clear_error(tmp_path, monkeypatch, body, needle):
    (tmp_path / "my_rewards_bad.py").write_text(f"def r(completion, answer, finished):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "my_rewards_bad", raising=False)
    rw = load_reward("my_rewards_bad:r")
    with pytest.raises(UserError) as e:
        score([rw], "<think>a</think>1", "1", True, "prompts.jsonl:7")
    msg = str(e.value)
    assert needle in msg and "my_rewards_bad:r" in msg and "prompts.jsonl:7" in msg and "<think>a</think>1" in msg


# ---------------------------------------------------------------- sampling


def test_a_rows_samples_do_not_depend_on_its_batch(tokenizer):
    """With per-row uniforms a prompt's completion is the same alone, beside other prompts, or at another
    place in the batch (what makes a rollout the same on one rank or many)."""
    from models import DenseLM, make_config
    from models.generate import generate
    from train.grpo import sample_uniforms

    torch.manual_seed(0)
    model = DenseLM(make_config("dense", "micro", vocab_size=len(tokenizer))).eval()
    a, b, c = [5, 6, 7, 8, 9], [10, 11], [12, 13, 14]
    u = [sample_uniforms(0, 3, k, 0, 12) for k in range(3)]
    alone = generate(model, [a], 12, temperature=1.0, uniforms=u[0][None])
    batch = generate(model, [b, a, c], 12, temperature=1.0, uniforms=torch.stack([u[1], u[0], u[2]]))
    assert batch[1] == alone[0]
    other = generate(model, [b], 12, temperature=1.0, uniforms=u[0][None])
    assert other[0] != alone[0]  # the numbers do decide the sample (a different prompt, another text)
    assert not torch.equal(sample_uniforms(0, 3, 0, 0, 12), sample_uniforms(0, 3, 0, 1, 12))
    assert not torch.equal(sample_uniforms(0, 3, 0, 0, 12), sample_uniforms(1, 3, 0, 0, 12))


# ---------------------------------------------------------------- runs


REWARD_MODULE = textwrap.dedent(
    """
    def varied(completion, answer, finished):
        # something every micro model's samples differ in, so groups have non-zero advantages
        return (len(completion) % 7) / 7.0
    """
)


def _args(init, synthetic_dir, out, *extra):
    return [
        "--init",
        str(init),
        "--data",
        str(synthetic_dir / "rl_train.jsonl"),
        "--eval-data",
        str(synthetic_dir / "rl_eval.jsonl"),
        "--eval-records",
        "6",
        "--out",
        str(out),
        "--group-size",
        "4",
        "--prompts-per-step",
        "4",
        "--batch-size",
        "6",
        "--max-new-tokens",
        "24",
        "--max-steps",
        "4",
        "--eval-every",
        "4",
        "--save-every",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--no-progress",
        "--reward",
        "exact=1",
        "format=0.1",
        "grpo_test_rewards:varied=1",
        *extra,
    ]


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["grpo", "dapo"])
def test_run_logs_every_figure_and_resumes_exactly(variant, sft_model_dir, synthetic_dir, tmp_path, rewards_module):
    """A run logs reward, accuracy, length, clip fraction, KL and entropy each step; stopped at step 2
    and resumed it gives the uninterrupted run's figures, with two inner steps per rollout (so the
    sampling policy's log-probs and the clip are in play) and a KL term."""
    extra = ["--variant", variant, "--inner-steps", "2", "--kl-beta", "0.05"]
    summary = grpo_main(_args(sft_model_dir, synthetic_dir, tmp_path / "a", *extra))
    steps = [r for r in _records(tmp_path / "a") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in (
            "reward",
            "accuracy",
            "response_length",
            "clip_fraction",
            "kl",
            "entropy",
            "reward_exact",
            "reward_format",
            "reward_grpo_test_rewards:varied",
            "groups_kept",
            "rollout_s",
        ):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert 0 < r["response_length"] <= 24 and r["entropy"] > 0
    assert steps[0]["kl"] == 0.0 and steps[0]["clip_fraction"] == 0.0  # the policy is the reference, ratio 1
    assert steps[1]["kl"] > 0 and steps[1]["ratio"] != 1.0  # the second inner step: the policy has moved
    assert steps[0]["reward"] == steps[1]["reward"]  # one rollout serves both inner steps
    assert "eval_accuracy" in summary["eval_before"] and "eval_accuracy" in summary["eval_after"]

    grpo_main(_args(sft_model_dir, synthetic_dir, tmp_path / "b", *extra, "--stop-after", "2"))
    grpo_main(_args(sft_model_dir, synthetic_dir, tmp_path / "b", *extra, "--resume"))
    resumed = [r for r in _records(tmp_path / "b") if "loss" in r]
    figures = lambda rows: [(r["step"], r["loss"], r["reward"], r["kl"]) for r in rows]  # noqa: E731
    assert figures(resumed) == figures(steps)


def test_options_that_break_rollouts_are_refused(sft_model_dir, synthetic_dir, tmp_path, cli_error):
    base = ["grpo"] + _args(sft_model_dir, synthetic_dir, tmp_path / "x")[:-4]
    cli_error(base + ["--inner-steps", "3"], "multiples of --inner-steps")
    cli_error(base + ["--group-size", "1"], "--group-size must be at least 2")
    cli_error(base + ["--temperature", "0"], "--temperature must be positive")
    cli_error(base + ["--grad-accum", "2"], "--grad-accum follows from the rollout")
    cli_error(base + ["--reward", "nope"], "unknown reward")
    cli_error(base + ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json")], "use ZeRO-1 or ZeRO-2")
    cli_error(base + ["--expert-parallel-size", "2"], "--expert-parallel-size is not supported")


def test_a_nan_reward_stops_the_run_with_one_line(sft_model_dir, synthetic_dir, tmp_path, monkeypatch, cli_error):
    (tmp_path / "nan_reward_mod.py").write_text("def r(completion, answer, finished):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["grpo"] + _args(sft_model_dir, synthetic_dir, tmp_path / "x")[:-4] + ["--reward", "nan_reward_mod:r"]
    err = cli_error(args, "reward nan_reward_mod:r returned nan")
    assert "rl_train.jsonl:" in err


def test_vlm_takes_the_same_stage_with_images(sft_model_dir, tmp_path, rewards_module):
    """A VLM's prompts carry their images into generation and into the training rows."""
    from train.data.synthetic_images import generate_images
    from train.vlm_init import init_vlm

    data = generate_images(tmp_path / "img", train=16, held_out=4)
    init_vlm(str(sft_model_dir), str(tmp_path / "vlm0"), preset="micro")
    args = _args(tmp_path / "vlm0", tmp_path, tmp_path / "g")
    args[args.index("--data") + 1] = str(data["vlm_sft_train"])
    args[args.index("--eval-data") + 1] = str(data["vlm_sft_eval"])
    summary = grpo_main(args + ["--max-steps", "2", "--save-every", "2", "--eval-every", "2"])
    steps = [r for r in _records(tmp_path / "g") if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["entropy"] > 0 for r in steps)
    assert summary["eval_after"]["eval_records"] == 6
    from models import load_pretrained

    before, after = load_pretrained(tmp_path / "vlm0"), load_pretrained(tmp_path / "g")
    moved = [n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert any(n.startswith("vision_tower.") for n in moved)  # the images reached the loss's gradient


def test_the_policy_learns_what_the_reward_asks(sft_model_dir, synthetic_dir, tmp_path):
    """A reward for writing the letter 'e' (verify's; the micro model's samples vary a lot, so groups carry
    signal): the sampled reward climbs well above where it started (a sign error or a wrong mask would not)."""
    args = _args(sft_model_dir, synthetic_dir, tmp_path / "l")[:-4] + ["--reward", "train.verify:letter_reward"]
    args += ["--max-steps", "16", "--save-every", "16", "--eval-every", "0", "--lr", "3e-3", "--prompts-per-step", "8"]
    grpo_main(args)
    rewards = [r["reward"] for r in _records(tmp_path / "l") if "reward" in r]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > 1.5 * first + 0.02, rewards


def test_generation_batches_do_not_change_the_rollout(sft_model_dir, synthetic_dir, tmp_path, rewards_module):
    """Sampling the rollout in generate calls of 5 rows gives the run of one call for all 16."""
    runs = []
    for name, rows in (("all", "0"), ("fives", "5")):
        args = _args(sft_model_dir, synthetic_dir, tmp_path / name) + ["--generation-batch-size", rows]
        grpo_main(args + ["--max-steps", "2", "--save-every", "2", "--eval-every", "0"])
        runs.append([(r["reward"], r["response_length"], r["loss"]) for r in _records(tmp_path / name) if "loss" in r])
    assert runs[0] == runs[1] and len(runs[0]) == 2
