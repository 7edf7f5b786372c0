import os

# Kernel modules must see this before they are imported: Triton kernels run on the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("LLM_SCRATCH_KERNELS", None)
# DeepSpeed's JIT-built C++ ops (shared-memory comm, cpu_adam) go to a cache inside the checkout,
# so a CI run compiles them once; DeepSpeed runs on CPU ranks when there is no GPU.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_ROOT, ".cache", "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from train.data.synthetic import generate

    d = tmp_path_factory.mktemp("synthetic")
    generate(d, seed=0, pretrain_docs=3000, sft=300, dpo=100)
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(synthetic_dir, tmp_path_factory):
    from train.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([synthetic_dir / "pretrain_train.jsonl", synthetic_dir / "sft_train.jsonl"], 1024, d, quiet=True)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from train.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory, synthetic_dir, tokenizer_dir):
    """A micro model briefly pretrained and SFT-trained, as the DPO stage's starting point."""
    from train.pretrain import main as pretrain_main
    from train.sft import main as sft_main

    d = tmp_path_factory.mktemp("dpo-init")
    pretrain_main(
        [
            "--data",
            str(synthetic_dir / "pretrain_train.jsonl"),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(d / "pre"),
            "--preset",
            "micro",
            "--seq-len",
            "64",
            "--batch-size",
            "8",
            "--max-steps",
            "20",
            "--eval-every",
            "0",
            "--no-progress",
            "--lr",
            "1e-2",
        ]
    )
    sft_main(
        [
            "--init",
            str(d / "pre"),
            "--data",
            str(synthetic_dir / "sft_train.jsonl"),
            "--out",
            str(d / "sft"),
            "--seq-len",
            "256",
            "--batch-size",
            "8",
            "--max-steps",
            "20",
            "--eval-every",
            "0",
            "--no-progress",
            "--lr",
            "1e-2",
        ]
    )
    return d / "sft"


@pytest.fixture
def cli_error(capsys):
    """cli_error(argv, needle): `llm-scratch ARGV` ends with exit status 2 and one 'error: ...' line on stderr
    that contains needle, and no traceback. Returns the line."""

    def run(argv: list[str], needle: str) -> str:
        from train.cli import main

        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
        assert err.count("\n") == 1, err  # one line
        return err

    return run


def scripted_model(tokenizer, chain: list[int]):
    """A dense model whose greedy continuation of chain[i] is chain[i + 1], whatever came before: the
    blocks add nothing to the residual stream (zero output projections), the chain's embeddings are
    orthogonal, and each lm_head row points at its predecessor's embedding. Deterministic reasoning and
    answers for tests of what is done with them."""
    import torch

    from models import DenseLM, make_config

    torch.manual_seed(0)
    config = make_config("dense", "micro", vocab_size=len(tokenizer), tie_word_embeddings=False)
    model = DenseLM(config).eval()
    d = config.hidden_size
    assert len(chain) <= d
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        basis = torch.linalg.qr(torch.randn(d, d))[0] * d**0.5  # orthogonal rows of RMS 1
        model.lm_head.weight.zero_()
        for i, token in enumerate(chain):
            model.model.embed_tokens.weight[token] = basis[i]
            if i + 1 < len(chain):
                model.lm_head.weight[chain[i + 1]] += 10 * basis[i] / d**0.5
    return model


@pytest.fixture(scope="session")
def scripted_checkpoint(tmp_path_factory, tokenizer_dir, tokenizer):
    """(checkpoint, reasoning, answer): a model that, asked anything in the chat format, always thinks
    the same short reasoning (e.g. 'Add the ones first.') and answers the same (e.g. 'So: 42!'), then
    <|im_end|>. The script maps each token to the next, so its tokens must all differ: the first candidate
    whose tokens do under the tokenizer the synthetic data trained is used."""
    from models import save_model

    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    newline = ids("\n")[-1]  # the generation prompt ends "<|im_start|>assistant\n"
    candidates = [("Add the ones first.", "So: 42!"), ("Look at the ones.", "It is 42!"), ("Count the tens.", "So: 9?")]
    for reasoning, answer in candidates:
        chain = [newline, *ids("<think>"), *ids(reasoning), *ids("</think>"), *ids(answer), *ids("<|im_end|>")]
        if len(set(chain)) == len(chain):
            break
    else:
        raise AssertionError(f"every candidate script repeats a token under this tokenizer: {candidates}")
    d = tmp_path_factory.mktemp("scripted") / "model"
    save_model(scripted_model(tokenizer, chain), d, tokenizer_dir)
    return d, reasoning, answer


@pytest.fixture
def micro_losses(synthetic_dir, tokenizer_dir):
    """run(out, *options) -> the per-step losses of a short micro pretraining run (4 rows of 32 tokens)."""
    import json

    from train.pretrain import main as pretrain_main

    def run(out, *extra, steps: int = 4) -> list[float]:
        pretrain_main(
            ["--data", str(synthetic_dir / "pretrain_train.jsonl"), "--tokenizer", str(tokenizer_dir)]
            + ["--out", str(out), "--preset", "micro", "--seq-len", "32", "--batch-size", "4"]
            + ["--max-steps", str(steps), "--eval-every", "0", "--no-progress", *extra]
        )
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    return run
