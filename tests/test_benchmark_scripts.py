"""The GPU benchmark scripts run end to end here (tiny shapes, the interpreter), so they do not rot
between the runs that have a GPU."""

from benchmarks.kernels import run


def test_kernel_benchmark_smoke(tmp_path):
    path = run(smoke=True, out_dir=tmp_path)
    text = path.read_text()
    for op in ("rms_norm", "swiglu", "apply_rope"):
        assert f"| {op} | 64 | 8 | ours (triton) |" in text and f"| {op} | 64 | 8 | torch eager |" in text
    assert "copy bandwidth" in text


def test_mla_moe_benchmark_smoke(tmp_path):
    from benchmarks.kernels_mla_moe import run as run_mla_moe

    text = run_mla_moe(smoke=True, out_dir=tmp_path).read_text()
    for op, prov in (
        ("mla train fwd+bwd", "SDPA, V padded"),
        ("mla decode", "ours (triton)"),
        ("moe layer fwd+bwd", "per-expert loop"),
        ("moe layer fwd+bwd", "ours (triton)"),
    ):
        assert f"| {op} |" in text and f"| {prov} |" in text
    assert "failed" not in text and "TFLOP/s" in text


def test_grouped_mm_baseline_computes_the_moe_layer():
    """The torch._grouped_mm baseline is the same function as ours (else the comparison means nothing)."""
    import pytest
    import torch

    from benchmarks.kernels_mla_moe import grouped_mm_experts
    from kernels.moe_dispatch import moe_experts_reference

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm (the benchmark leaves that baseline out too)")
    torch.manual_seed(0)
    x, weight = torch.randn(20, 32), torch.rand(20, 2)
    idx = torch.stack([torch.randperm(5)[:2] for _ in range(20)])
    w_gate_up, w_down = torch.randn(5, 48, 32), torch.randn(5, 32, 24)
    torch.testing.assert_close(
        grouped_mm_experts(x, idx, weight, w_gate_up, w_down), moe_experts_reference(x, idx, weight, w_gate_up, w_down)
    )


def test_serve_load_benchmark_smoke(tmp_path):
    from benchmarks.serve_load import run as run_serve_load

    text = run_serve_load(levels=(1, 3), max_tokens=4, preset="micro", out_dir=tmp_path).read_text()
    assert "| 1 | " in text and "| 3 | " in text and "TTFT p50" in text
    row = next(line for line in text.splitlines() if line.startswith("| 3 |"))
    assert 1 <= int(row.split("|")[4]) <= 3  # the peak batch is measured, and bounded by the streams


def test_fused_ce_memory_benchmark_smoke(tmp_path):
    """The fused head's memory benchmark runs end to end on a small vocabulary, both ways giving one loss."""
    from benchmarks.fused_ce_memory import run as run_fused_ce

    text = run_fused_ce([500], 64, 16, out_dir=tmp_path).read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 500 |")]
    assert [r[3].strip() for r in rows] == ["materialised", "fused"]
    assert rows[0][7] == rows[1][7]  # the same loss, to 4 decimals


def test_train_e2e_benchmark_smoke(tmp_path):
    """The end-to-end GPU benchmark runs on `micro` configs here: every way gives a row, none fails."""
    from benchmarks.train_e2e import run as run_e2e

    text = run_e2e(smoke=True, out_dir=tmp_path).read_text()
    assert "failed" not in text
    for way in ("ours, eager, our kernels", "ours, eager, torch reference", "transformers + SDPA"):
        assert f"| dense | micro | {way} |" in text
    assert "| moe | micro | ours, eager, our kernels |" in text
