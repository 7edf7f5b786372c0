"""The documentation stays true: the math on docs/ops.md computes what the ops compute, every path named
in the repository's text exists, and every project command in the README and docs/ parses with the real
command-line parser (the options exist and take the values shown)."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


# ---------------------------------------------------------------- docs/ops.md


@pytest.fixture(scope="module")
def ops_page():
    namespace = {"torch": torch}
    for block in _blocks(ROOT / "docs" / "ops.md", "python"):
        exec(compile(block, "docs/ops.md", "exec"), namespace)  # noqa: S102 - the page's own code
    return namespace


def _close(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            _close(x, y)
        return
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_public_op_is_on_the_ops_page(ops_page):
    assert set(kernels.ops._TRITON_OPS) <= set(ops_page)


def test_ops_page_matches_the_references(ops_page):
    from models.layers import RotaryEmbedding

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, w = r(3, 5, 37), r(37)
    _close(ops_page["rms_norm"](x, w, 1e-6), kernels.rms_norm(x, w, 1e-6, backend="torch"))
    a, b = r(4, 19), r(4, 19)
    _close(ops_page["swiglu"](a, b), kernels.swiglu(a, b, backend="torch"))
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
    cos, sin = RotaryEmbedding(16, 10000.0)(pos, torch.float32)
    q, k = r(2, 3, 5, 16), r(2, 1, 5, 16)
    for layout in ("half", "interleaved"):
        _close(ops_page["apply_rope"](q, k, cos, sin, layout), kernels.apply_rope(q, k, cos, sin, layout, "torch"))
    qn, qr, kn, kr, v = r(2, 3, 6, 8), r(2, 3, 6, 4), r(2, 3, 6, 8), r(2, 1, 6, 4), r(2, 3, 6, 5)
    _close(
        ops_page["mla_attention"](qn, qr, kn, kr, v, 0.3),
        kernels.mla_attention(qn, qr, kn, kr, v, 0.3, backend="torch"),
    )
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)
    _close(
        ops_page["mla_attention"](qn, qr, kn, kr, v, 0.3, mask),
        kernels.mla_attention(qn, qr, kn, kr, v, 0.3, mask, backend="torch"),
    )
    h, hw, t = r(2, 7, 16), r(50, 16), torch.randint(0, 50, (2, 7), generator=g)
    t[0, :3] = -100
    for eps, z, red in ((0.0, 0.0, "mean"), (0.1, 1e-3, "sum"), (0.2, 1e-2, "none")):
        _close(
            ops_page["linear_cross_entropy"](h, hw, t, -100, eps, z, red),
            kernels.linear_cross_entropy(h, hw, t, -100, eps, z, red, backend="torch"),
        )
    ql, qr1, ckv, kr1 = r(2, 3, 1, 12), r(2, 3, 1, 4), r(2, 9, 12), r(2, 9, 4)
    _close(ops_page["mla_decode"](ql, qr1, ckv, kr1, 0.2), kernels.mla_decode(ql, qr1, ckv, kr1, 0.2, backend="torch"))
    ql, qr1 = r(2, 3, 4, 12), r(2, 3, 4, 4)  # four new tokens after five cached ones
    _close(
        ops_page["mla_decode"](ql, qr1, ckv, kr1, 0.2),
        kernels.mla_decode(ql, qr1, ckv, kr1, 0.2, torch.ones(4, 9, dtype=torch.bool).tril(5), backend="torch"),
    )
    x, wgu, wd = r(7, 10), r(5, 12, 10), r(5, 10, 6)
    idx = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(7)])
    weight = torch.rand(7, 2, generator=g)
    _close(ops_page["moe_experts"](x, idx, weight, wgu, wd), kernels.moe_experts(x, idx, weight, wgu, wd, "torch"))
    counts = torch.tensor([3, 0, 2, 1, 1])
    _close(ops_page["grouped_mlp"](x, counts, wgu, wd), kernels.grouped_mlp(x, counts, wgu, wd, "torch"))


# ---------------------------------------------------------------- paths named in the text

PATH = re.compile(r"(?<![\w./-])((?:kernels|models|train|benchmarks|tests|docs|ds_configs)/[\w./{},*-]*[\w/}])")


def _tracked_text_files() -> list[Path]:
    git = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    names = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    keep = (".py", ".md", ".sh", ".toml", ".json", ".cfg", ".txt", "Makefile", ".gitignore", "run")
    return [ROOT / n for n in names.splitlines() if n.endswith(keep) and (ROOT / n).is_file()]


def _exists(ref: str) -> bool:
    ref = ref.rstrip("/.")
    if any(ch in ref for ch in "*{}") or "DATE" in ref or "STAGE" in ref:  # a pattern: its directory must exist
        return (ROOT / ref.split("*")[0].split("{")[0].rsplit("/", 1)[0]).is_dir()
    return (ROOT / ref).exists()


def test_every_path_named_in_the_repository_exists():
    missing = []
    for path in _tracked_text_files():
        for ref in PATH.findall(path.read_text(errors="replace")):
            if not _exists(ref):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert missing == []


def test_the_path_check_would_see_a_missing_file():
    gone = "models" + "/hf_moe.py"  # spelled in two pieces so that the scan of this file does not find it
    assert PATH.findall(f"see {gone} and `train/engine/`.") == [gone, "train/engine/"]
    assert not _exists(gone) and _exists("train/engine/")


# ---------------------------------------------------------------- commands in the README and docs/


def _commands(path: Path) -> list[str]:
    out = []
    for block in _blocks(path, "bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _parse(argv: list[str]):
    """Parse a project command line with the parser the real program uses; None for other programs."""
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return None
    prog = Path(argv[0]).name
    if prog == "llm-scratch":
        from train.cli import build_parser

        return build_parser().parse_args(argv[1:])
    module = None
    if prog in ("python", "python3") and argv[1:2] == ["-m"]:
        module, rest = argv[2], argv[3:]
    elif prog == "deepspeed" and "--module" in argv:
        i = argv.index("--module")
        module, rest = argv[i + 1], argv[i + 2 :]
    elif prog == "torchrun" and "-m" in argv:
        i = argv.index("-m")
        module, rest = argv[i + 1], argv[i + 2 :]
    if module is None or not module.startswith("train."):
        return None
    import importlib

    return importlib.import_module(module).build_parser().parse_args(rest)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_project_commands_in_the_docs_parse(doc, capsys):
    parsed = 0
    for line in _commands(doc):
        try:
            ns = _parse(shlex.split(line))
        except SystemExit:
            pytest.fail(f"{doc.name}: this command does not parse: {line}\n{capsys.readouterr().err}")
        parsed += ns is not None
    if doc.name == "README.md":
        assert parsed >= 5
