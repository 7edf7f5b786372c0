"""The GPU benchmark script runs end to end (tiny shapes, the interpreter), so it does not rot between
the sessions that have a GPU."""

from benchmarks.kernels import run


def test_kernel_benchmark_smoke(tmp_path):
    path = run(smoke=True, out_dir=tmp_path)
    text = path.read_text()
    for op in ("rms_norm", "swiglu", "apply_rope"):
        assert f"| {op} | 64 | 8 | ours (triton) |" in text and f"| {op} | 64 | 8 | torch eager |" in text
    assert "copy bandwidth" in text
