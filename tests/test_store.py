"""The token store (`llm-scratch prepare`, train/data/{sources,store,prepare,corpus}.py): the same rows as
tokenizing in memory, the same bytes whatever the workers or interruptions, every input format, bounded
reading, mixtures, rank shares, and one clear error for each kind of bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data.batches import BatchOrder
from train.data.formats import iter_pretrain_texts
from train.data.packing import MixedRows, PackedDataset, tokenize_documents
from train.data.prepare import prepare
from train.data.store import TokenStore

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["--preset", "micro", "--seq-len", "32", "--batch-size", "4", "--max-steps", "2", "--no-progress"]


def shard_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.suffix in (".tokens", ".docs", ".crc")}


def texts_file(path: Path, n: int, seed: int = 0, words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "42", "é", "naïve", "\n", "日本", "x+y=z", "  ", "!"]
    texts = [" ".join(rng.choice(vocab, size=rng.integers(1, words))) for _ in range(n)]
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return texts


def test_store_rows_equal_the_in_memory_rows(tmp_path, synthetic_dir, tokenizer_dir, tokenizer):
    src = synthetic_dir / "pretrain_train.jsonl"
    store = tmp_path / "store"
    prepare([src], tokenizer_dir, store, workers=0, block_bytes=50_000, shard_bytes=100_000, quiet=True)
    st = TokenStore(store)
    assert len(st.shards) > 2  # rows cross shard boundaries
    stream = tokenize_documents(list(iter_pretrain_texts(src)), tokenizer, st.eot_id)
    assert np.array_equal(st.read(0, len(st)), stream)
    for seq_len in (32, 257):
        a, b = PackedDataset(stream, seq_len, st.eot_id), PackedDataset(st, seq_len, st.eot_id)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            ra, rb = a[i], b[i]
            assert all(torch.equal(ra[k], rb[k]) for k in ra)
    ends = st.document_ends()
    assert len(ends) == st.manifest["documents"] and (stream[ends.astype(np.int64) - 1] == st.eot_id).all()


def test_workers_do_not_change_the_bytes(tmp_path, synthetic_dir, tokenizer_dir):
    src = [synthetic_dir / "pretrain_train.jsonl", synthetic_dir / "pretrain_eval.jsonl"]
    outs = []
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        prepare(src, tokenizer_dir, out, workers=workers, block_bytes=50_000, shard_bytes=60_000, quiet=True)
        outs.append(shard_bytes(out))
    assert len(outs[0]) >= 6 and outs[0] == outs[1] == outs[2]


def test_a_killed_prepare_continues_to_the_same_bytes(tmp_path, tokenizer_dir):
    src = tmp_path / "corpus.jsonl"
    texts_file(src, 60_000, words=60)
    whole = tmp_path / "whole"
    opts = dict(workers=0, block_bytes=100_000, shard_bytes=60_000, quiet=True)
    prepare([src], tokenizer_dir, whole, **opts)
    out = tmp_path / "killed"
    code = (
        "import sys; from train.data.prepare import prepare; "
        f"prepare([{str(src)!r}], {str(tokenizer_dir)!r}, {str(out)!r}, **{opts!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    state = out / "prepare.state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text() or '{"shards": []}')["shards"]) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (out / "manifest.json").exists(), "the prepare ended before it could be killed"
    done = len(json.loads(state.read_text())["shards"])
    run = subprocess.run(
        [sys.executable, "-c", code.replace("quiet': True", "quiet': False")], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert f"continuing {out} after {done} shard(s)" in run.stdout
    assert shard_bytes(out) == shard_bytes(whole)
    assert (
        json.loads((out / "manifest.json").read_text())["shards"]
        == json.loads((whole / "manifest.json").read_text())["shards"]
    )


def test_an_unchanged_prepare_does_nothing_and_a_changed_input_redoes_it(tmp_path, tokenizer_dir, capsys):
    src = tmp_path / "a.jsonl"
    texts_file(src, 300)
    out = tmp_path / "store"
    prepare([src], tokenizer_dir, out)
    first = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    prepare([src], tokenizer_dir, out)
    assert "is up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == first
    texts_file(src, 200, seed=1)
    m = prepare([src], tokenizer_dir, out, quiet=True)
    assert m["documents"] == 200 and TokenStore(out).manifest["documents"] == 200


def test_every_input_format_gives_the_same_tokens(tmp_path, tokenizer_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = texts_file(tmp_path / "c.jsonl", 500)
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write((tmp_path / "c.jsonl").read_bytes())
    pq.write_table(pa.table({"id": list(range(500)), "body": texts}), tmp_path / "c.parquet", row_group_size=64)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts[:30]):
        (txt_dir / f"{i:03d}.txt").write_text(t, encoding="utf-8")

    def tokens(inputs, name, **kw):
        prepare(inputs, tokenizer_dir, tmp_path / f"s-{name}", workers=0, block_bytes=3000, quiet=True, **kw)
        return TokenStore(tmp_path / f"s-{name}").read(0, 10**9)

    ref = tokens([tmp_path / "c.jsonl"], "jsonl")
    assert np.array_equal(tokens([tmp_path / "c.jsonl.gz"], "gz"), ref)
    assert np.array_equal(tokens([tmp_path / "c.parquet"], "pq", text_field="body"), ref)
    assert np.array_equal(tokens([tmp_path / "hf"], "hf"), ref)
    n30 = TokenStore(tmp_path / "s-jsonl").document_ends()[29]
    assert np.array_equal(tokens([txt_dir], "txt"), ref[: int(n30)])


def test_a_mixture_keeps_its_weights_and_ranks_share_each_epoch(tmp_path):
    a = PackedDataset(np.arange(1, 8001, dtype=np.int32) % 50 + 1, 8, 0)  # 999 rows
    b = PackedDataset(np.arange(1, 2001, dtype=np.int32) % 50 + 1, 8, 0)  # 249 rows
    mix = MixedRows([a, b], [0.3, 0.7])
    n = len(mix)
    assert n == len(a) + len(b) and abs(mix.counts[1] / n - 0.7) < 1e-3
    draws = []
    order = BatchOrder(n, 16, seed=3)
    for _ in range(200):
        draws += [mix.source_of(i) for i in order.next_indices()]
    share = np.mean(np.array(draws) == 1)
    sigma = (0.7 * 0.3 / len(draws)) ** 0.5
    assert abs(share - 0.7) < 4 * sigma  # within sampling error
    na, nb = mix.counts
    assert torch.equal(mix[n - 1]["input_ids"], b[(nb - 1) % len(b)]["input_ids"])  # upsampled: wraps around
    assert torch.equal(mix[na - 1]["input_ids"], a[(na - 1) * len(a) // na]["input_ids"])  # subsampled: evenly
    # two data-parallel ranks: disjoint rows, every row once per epoch (up to the dropped ragged tail)
    ranks = [BatchOrder(n, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [[], []]
    for _ in range(n // 16):
        for r in range(2):
            seen[r] += ranks[r].next_indices()
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == len(seen[0]) + len(seen[1]) == n // 16 * 16


def _read_rank_rows(rank: int, world: int, port: int, store: str, out: str):
    """One gloo rank: the trainer's batch order over a store's rows for one epoch; rank 0 gathers what each read."""
    import torch.distributed as dist

    from train.engine.distributed import dist_info

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    st = TokenStore(store)
    rows = PackedDataset(st, 16, st.eot_id)
    r, _, w = dist_info()
    order = BatchOrder(len(rows), 4, seed=11, rank=r, world_size=w)
    mine = []
    for _ in range(len(rows) // (4 * w)):
        mine += [(i, rows[i]["input_ids"].tolist()) for i in order.next_indices()]
    gathered = [None] * w
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_two_gloo_ranks_read_disjoint_rows_covering_the_epoch(tmp_path, tokenizer_dir):
    import socket

    import torch.multiprocessing as mp

    texts_file(tmp_path / "c.jsonl", 300)
    prepare([tmp_path / "c.jsonl"], tokenizer_dir, tmp_path / "s", workers=0, shard_bytes=4_000, quiet=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rows.json"
    mp.spawn(_read_rank_rows, args=(2, port, str(tmp_path / "s"), str(out)), nprocs=2, join=True)
    per_rank = json.loads(out.read_text())
    st = TokenStore(tmp_path / "s")
    rows = PackedDataset(st, 16, st.eot_id)
    seen = [{i for i, _ in r} for r in per_rank]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == len(rows) // 8 * 8 == sum(len(r) for r in per_rank)  # each row once
    for r in per_rank:  # what each rank read is the row itself
        assert all(ids == rows[i]["input_ids"].tolist() for i, ids in r)


def test_pretrain_mixes_stores_by_weight_and_refuses_another_tokenizer(tmp_path, tokenizer_dir, cli_error, capsys):
    from train.cli import main

    for name, seed in (("web", 0), ("code", 1)):
        texts_file(tmp_path / f"{name}.jsonl", 400, seed=seed)
        prepare([tmp_path / f"{name}.jsonl"], tokenizer_dir, tmp_path / name, quiet=True)
    run = tmp_path / "run"
    main(["pretrain", "--data", f"{tmp_path / 'web'}:0.7", f"{tmp_path / 'code'}:0.3", "--out", str(run), *MICRO])
    assert (run / "checkpoints").is_dir() and not (run / "data").exists()  # stores are read where they are
    capsys.readouterr()
    other = tmp_path / "other_tok"
    from train.data.tokenizer import train_tokenizer

    train_tokenizer([tmp_path / "web.jsonl"], 300, other, quiet=True)
    err = cli_error(
        [
            "pretrain",
            "--data",
            str(tmp_path / "web"),
            "--tokenizer",
            str(other),
            "--out",
            str(tmp_path / "run2"),
            "--preset",
            "micro",
            "--no-progress",
        ],
        "another tokenizer",
    )
    assert "fingerprint" in err and str(other) in err
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize(
    "make, needle",
    [
        (
            lambda d: (d / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n'),
            "x.jsonl:2: field 'text' is missing",
        ),
        (lambda d: (d / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n'), "x.jsonl:2: not UTF-8"),
        (lambda d: (d / "x.jsonl").write_text("\n\n"), "no documents in the input"),
        (lambda d: (d / "x.jsonl").write_text("[1, 2]\n"), "x.jsonl:1: expected a JSON object"),
        (lambda d: _parquet(d / "x.parquet", {"text": [1, 2]}), "x.parquet: column 'text' holds int64, not text"),
        (lambda d: _parquet(d / "x.parquet", {"body": ["a"]}), "x.parquet: no column 'text' (columns: body)"),
        (lambda d: _parquet(d / "x.parquet", {"text": ["a", None]}), "x.parquet: row 2: column 'text' is null"),
        (lambda d: (d / "x.parquet").write_text("not parquet"), "x.parquet: not a readable parquet file"),
        (lambda d: (d / "x.csv").write_text("a,b\n"), "x.csv: unsupported data file"),
    ],
)
def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, tokenizer_dir, cli_error, make, needle):
    data = tmp_path / "in"
    data.mkdir()
    make(data)
    path = next(data.iterdir())
    out = tmp_path / "store"
    cli_error(["prepare", "--data", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--quiet"], needle)
    assert not out.exists()


def _parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_a_damaged_store_is_an_error_naming_the_shard(tmp_path, tokenizer_dir, cli_error):
    src = tmp_path / "a.jsonl"
    texts_file(src, 2000)
    store = tmp_path / "store"
    prepare([src], tokenizer_dir, store, block_bytes=10_000, shard_bytes=40_000, quiet=True)
    shard = store / "00001.tokens"
    data = bytearray(shard.read_bytes())
    data[70_000 % len(data)] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    st = TokenStore(store)
    with pytest.raises(Exception, match=r"00001\.tokens: corrupted"):
        st.read(0, len(st))
    assert st.read(0, 10).shape == (10,)  # the good shard still reads
    shard.write_bytes(bytes(data[:-100]))
    args = ["pretrain", "--data", str(store), "--out", str(tmp_path / "run"), "--preset", "micro", "--no-progress"]
    err = cli_error(args, "00001.tokens")
    assert "truncated" in err
    (store / "manifest.json").write_text("{}")
    cli_error(args, "not a token store manifest")


def test_a_foreign_tokenizer_is_made_fit_and_the_model_follows(tmp_path, capsys):
    """A tokenizer in another layout (WordPiece-free BPE with Metaspace, <s>/</s>/<unk>, no ChatML) gets the
    project's special tokens and chat template; its own ids for plain text do not change."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from train.cli import main
    from train.data.tokenizer import fits_project, load_tokenizer

    src = tmp_path / "c.jsonl"
    texts = texts_file(src, 1500)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    foreign = tmp_path / "foreign"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        foreign
    )
    before = load_tokenizer(foreign)
    assert not fits_project(before)
    store = tmp_path / "store"
    main(["prepare", "--data", str(src), "--tokenizer", str(foreign), "--out", str(store), "--quiet"])
    run = tmp_path / "run"
    main(["pretrain", "--data", str(store), "--out", str(run), *MICRO])
    main(["prepare", "--data", str(src), "--tokenizer", str(foreign), "--out", str(tmp_path / "s2")])
    said = capsys.readouterr().out
    assert "lacked <|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>, <|image|>, <|pad|>" in said
    after = load_tokenizer(store / "tokenizer")
    assert fits_project(after) and len(after) == len(before) + 7
    assert after("the cat sat")["input_ids"] == before("the cat sat")["input_ids"]
    chat = after.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert chat.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = after.encode("<think>x</think><|im_end|>", add_special_tokens=False)
    assert after.convert_ids_to_tokens(ids)[0] == "<think>" and "<|im_end|>" in after.convert_ids_to_tokens(ids)
    cfg = json.loads(next((run / "checkpoints").glob("*/model_config.json")).read_text())
    assert cfg["vocab_size"] >= len(after)


def test_prepare_runs_as_a_command_with_workers(tmp_path, synthetic_dir, tokenizer_dir):
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "train.cli",
        "prepare",
        "--data",
        str(synthetic_dir / "pretrain_train.jsonl"),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
        "--workers",
        "2",
        "--eval-fraction",
        "0.1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and "B/s" in r.stderr  # the progress bar's throughput
    assert TokenStore(out).eval_fraction == 0.1


def test_sft_and_dpo_stores_give_the_in_memory_examples(tmp_path, synthetic_dir, tokenizer_dir, tokenizer):
    from train.data.finetune import (
        PackedSFTDataset,
        build_dpo_examples,
        build_sft_examples,
        trained_tokens,
    )
    from train.data.finetune_store import StoredDPOExamples, StoredSFTExamples
    from train.data.formats import load_dpo, load_sft

    sft, dpo = synthetic_dir / "sft_train.jsonl", synthetic_dir / "dpo_train.jsonl"
    for kind in ("sft", "dpo"):
        prepare(
            [sft if kind == "sft" else dpo],
            tokenizer_dir,
            tmp_path / kind,
            workers=2,
            block_bytes=100_000,
            shard_bytes=200_000,
            quiet=True,
            kind=kind,
        )
    convs, pairs = load_sft(sft), load_dpo(dpo)
    for max_len in (24, 160):  # 24 drops and truncates many; 160 few
        want, dropped = build_sft_examples(tokenizer, convs, max_len)
        got = StoredSFTExamples(TokenStore(tmp_path / "sft"), max_len)
        assert len(got) == len(want) and got.dropped == dropped and (max_len == 160 or dropped > 0)
        for a, b in zip(want, got):
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.trained, b.trained)
        assert trained_tokens(got) == trained_tokens(want)
        assert list(got.lengths()) == [len(e.ids) for e in want]
        pa, pb = PackedSFTDataset(want, max_len, 6), PackedSFTDataset(got, max_len, 6)
        assert len(pa) == len(pb)
        for i in range(0, len(pa), 7):
            assert all(torch.equal(pa[i][k], pb[i][k]) for k in pa[i])
        want, dropped = build_dpo_examples(tokenizer, pairs, max_len)
        got = StoredDPOExamples(TokenStore(tmp_path / "dpo"), max_len)
        assert len(got) == len(want) and got.dropped == dropped
        for a, b in zip(want, got):
            assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("prompt", "chosen", "rejected"))


def test_finetune_stores_read_trl_parquet_and_refuse_the_wrong_kind(tmp_path, tokenizer_dir, sft_model_dir, cli_error):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"what is {i}+1?", "completion": f"<think>\ncount\n</think>\n\n{i + 1}"} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pc.parquet", row_group_size=16)
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("pc.parquet", "pc.jsonl"):
        prepare([tmp_path / name], tokenizer_dir, tmp_path / f"s-{name}", quiet=True, kind="sft")
    a, b = TokenStore(tmp_path / "s-pc.parquet"), TokenStore(tmp_path / "s-pc.jsonl")
    assert np.array_equal(a.read(0, len(a)), b.read(0, len(b))) and a.num_docs == 50
    assert np.array_equal(a.read(0, len(a), "mask"), b.read(0, len(b), "mask"))
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    cli_error(
        [
            "prepare",
            "--kind",
            "sft",
            "--data",
            str(tmp_path / "bad.jsonl"),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(tmp_path / "bad"),
            "--quiet",
        ],
        "bad.jsonl:2: field 'messages'",
    )
    assert not (tmp_path / "bad").exists()
    args = ["--data", str(tmp_path / "s-pc.jsonl"), "--init", str(sft_model_dir), "--out", str(tmp_path / "r")]
    cli_error(
        ["dpo", *args, "--no-progress", "--seq-len", "64"],
        "s-pc.jsonl is a sft store; this stage reads a dpo store",
    )
    assert not (tmp_path / "r").exists()


def test_prepare_writes_only_into_a_new_empty_or_own_directory(tmp_path, tokenizer_dir, cli_error):
    src = tmp_path / "a.jsonl"
    texts_file(src, 50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["prepare", "--data", str(src), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--quiet"]
    cli_error(args, "not empty (notes.txt is there) and not a token store")
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    (out / "notes.txt").unlink()
    from train.cli import main

    main(args)
    main(args)  # its own store: brought up to date in place
    assert TokenStore(out).manifest["documents"] == 50


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    from train.data.store import FORMAT, MANIFEST, VERSION, ShardWriter, content_hash, token_dtype, write_json

    assert token_dtype(65536) == np.uint16 and token_dtype(151_665) == np.uint32
    ids = np.array([0, 70_000, 151_664, 5, 0, 99_999, 0], dtype=np.uint32)
    w = ShardWriter(tmp_path, token_dtype(151_665), shard_tokens=4, index=0)
    w.add(ids[:5], np.array([2, 3]))
    shards = [w.finish()]
    w.add(ids[5:], np.array([2]))
    shards.append(w.finish())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "text",
        "dtype": "uint32",
        "eot_id": 0,
        "vocab_size": 151_665,
        "tokenizer_fingerprint": "x",
        "shards": shards,
        "content_hash": content_hash("uint32", 0, shards),
    }
    write_json(tmp_path / MANIFEST, manifest)
    st = TokenStore(tmp_path)
    assert np.array_equal(st.read(0, 7), ids) and st.read(3, 6).dtype == np.uint32
    assert list(st.document_ends()) == [2, 5, 7]
