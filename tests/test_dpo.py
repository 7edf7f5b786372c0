"""The DPO loss against hand-computed numbers, and the DPO stage's two reference paths."""

import math

import pytest
import torch

import kernels
from models import IGNORE_INDEX
from train.losses import dpo_loss, sequence_logps


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_sigmoid_dpo_by_hand():
    # d = (pi_c - ref_c) - (pi_r - ref_r) = (-10 + 11) - (-12 + 11) = 2
    loss, stats = dpo_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-12)  # -log sigmoid(0.2)
    assert stats["reward_chosen"] == pytest.approx(0.1) and stats["reward_rejected"] == pytest.approx(-0.1)
    assert stats["margin"] == pytest.approx(0.2) and stats["accuracy"] == 1.0


def test_conservative_label_smoothing_by_hand():
    eps, z = 0.1, 0.1 * 2
    loss, _ = dpo_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0), beta=0.1, label_smoothing=eps)
    want = (1 - eps) * math.log(1 + math.exp(-z)) + eps * math.log(1 + math.exp(z))
    assert loss.item() == pytest.approx(want, abs=1e-12)


def test_ipo_by_hand_and_mean_over_pairs():
    loss, _ = dpo_loss(_t(-10.0, -5.0), _t(-12.0, -5.0), _t(-11.0, -5.0), _t(-11.0, -5.0), beta=0.1, loss_type="ipo")
    # pair 1: d = 2 -> (2 - 5)^2 = 9; pair 2: d = 0 -> 25
    assert loss.item() == pytest.approx((9 + 25) / 2)


def test_equal_policy_and_reference_gives_ln2():
    x = torch.randn(7, dtype=torch.float64)
    y = torch.randn(7, dtype=torch.float64)
    loss, stats = dpo_loss(x, y, x.clone(), y.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12) and stats["margin"] == 0


def test_sequence_logps_by_hand():
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]])
    targets = torch.tensor([[1, IGNORE_INDEX, 2]])
    # the fused head's per-token log-probs, from a head whose logits are log(probs)
    hidden, weight = torch.log(probs), torch.eye(3)
    token_logps = -kernels.linear_cross_entropy(hidden, weight, targets, reduction="none")
    assert token_logps[0, 1].item() == 0.0  # ignored
    want = math.log(0.25) + math.log(0.6)
    assert sequence_logps(token_logps, targets).item() == pytest.approx(want, abs=1e-6)
    assert sequence_logps(token_logps, targets, average=True).item() == pytest.approx(want / 2, abs=1e-6)


def _dpo(init, synthetic_dir, out, *extra):
    from train.dpo import main as dpo_main

    return dpo_main(
        [
            "--init",
            str(init),
            "--data",
            str(synthetic_dir / "dpo_train.jsonl"),
            "--eval-data",
            str(synthetic_dir / "dpo_eval.jsonl"),
            "--out",
            str(out),
            "--seq-len",
            "256",
            "--batch-size",
            "4",
            "--eval-batches",
            "2",
            "--no-progress",
            "--seed",
            "3",
            *extra,
        ]
    )


def test_both_reference_paths_give_the_same_losses(sft_model_dir, synthetic_dir, tmp_path):
    from train.engine.metrics import read_metrics

    common = ("--max-steps", "4", "--eval-every", "2", "--warmup-steps", "1", "--lr", "1e-3")
    _dpo(sft_model_dir, synthetic_dir, tmp_path / "pre", *common, "--reference", "precompute")
    _dpo(sft_model_dir, synthetic_dir, tmp_path / "model", *common, "--reference", "model")
    a, b = read_metrics(tmp_path / "pre" / "metrics.jsonl"), read_metrics(tmp_path / "model" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "eval_loss", "margin", "eval_margin"):
            if k in ra:
                # the two paths pad the same sequences into batches of different widths, so summed
                # log-probs of ~100 tokens differ by float rounding (~1e-5 nats, x beta in the margin)
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-5), (ra["step"], k)
    assert a[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # before training, policy == reference


def test_dpo_moves_and_resumes_exactly_from_stored_reference(sft_model_dir, synthetic_dir, tmp_path):
    from train.engine.metrics import read_metrics

    common = ("--max-steps", "30", "--eval-every", "30", "--warmup-steps", "3", "--lr", "2e-3")
    _dpo(sft_model_dir, synthetic_dir, tmp_path / "straight", *common)
    _dpo(sft_model_dir, synthetic_dir, tmp_path / "split", *common, "--stop-after", "15")
    assert (tmp_path / "split" / "reference_logps.pt").exists()
    s = _dpo(sft_model_dir, synthetic_dir, tmp_path / "split", *common, "--resume")
    assert s["start_step"] == 15 and s["end_step"] == 30
    keys = ("step", "loss", "margin", "accuracy", "grad_norm", "lr")
    straight = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    split = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert split == straight  # bit-exact: the stored reference log-probs are reused on resume
    train = straight
    # a loss stuck at ln 2 would mean nothing moved; measured: loss 0.69 -> ~0.55, margin 0 -> ~0.3
    assert sum(r["loss"] for r in train[-10:]) / 10 < math.log(2) - 0.05
    assert sum(r["margin"] for r in train[-10:]) / 10 > 0.1
    assert s["eval_after"]["eval_loss"] < math.log(2) - 0.1


def test_rpo_term_by_hand(monkeypatch):
    import train.dpo as dpo_mod
    from train.dpo import DPOObjective

    # two pairs: chosen rows first; targets mark 2 and 3 completion tokens of the chosen rows
    targets = torch.tensor([[5, 6, IGNORE_INDEX], [5, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX], [5, 6, 7]])
    obj = DPOObjective(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, average=False, sft_weight=0.5)
    pi = torch.tensor([[-4.0, -9.0], [-6.0, -3.0]], dtype=torch.float64)
    ref = torch.tensor([[-5.0, -8.0], [-6.0, -4.0]], dtype=torch.float64)
    monkeypatch.setattr(dpo_mod, "pair_logps", lambda module, batch, average: pi)
    loss, stats = obj(None, {"targets": targets, "ref_logps": ref})
    d = torch.tensor([(-4 + 5) - (-9 + 8), (-6 + 6) - (-3 + 4)], dtype=torch.float64)
    dpo = torch.nn.functional.softplus(-0.1 * d).mean().item()
    nll = (4.0 / 2 + 6.0 / 3) / 2  # per-token NLL of each chosen completion, averaged over pairs
    assert stats["chosen_nll"] == pytest.approx(nll)
    assert loss.item() == pytest.approx(dpo + 0.5 * nll, abs=1e-12)
