import json

import numpy as np
import pytest
import torch

from train.data.batches import BatchOrder
from train.data.formats import iter_pretrain_texts, load_dpo, load_sft
from train.data.packing import PackedDataset, segments_and_positions, tokenize_documents
from train.errors import DataError


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "loader, lines, needle",
    [
        (
            load_sft,
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "{oops"],
            ":2: not valid JSON",
        ),
        (load_sft, [{"conversation": []}], ":1: field 'messages' must be a non-empty list"),
        (load_sft, [{"messages": [{"role": "bot", "content": "x"}]}], ":1: messages[0].role must be one of"),
        (load_sft, [{"messages": [{"role": "user", "content": 3}]}], ":1: messages[0].content must be a string"),
        (load_sft, [{"messages": [{"role": "user", "content": "q"}]}], ":1: field 'messages' has no assistant"),
        (load_sft, ["[1, 2]"], ":1: expected a JSON object"),
        (load_dpo, [{"prompt": "q", "chosen": "a"}], ":1: missing field 'rejected'"),
        (load_dpo, [{"prompt": "q", "chosen": "a", "rejected": 5}], "field 'rejected' must be a string"),
        (
            load_dpo,
            [{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}],
            "field 'chosen' must end with an assistant message",
        ),
        (
            lambda p: list(iter_pretrain_texts(p)),
            ["", {"text": "ok"}, {"txt": "no"}],
            ":3: field 'text' must be a string",
        ),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, loader, lines, needle):
    path = _write(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as e:
        loader(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_sft(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=".txt or .jsonl"):
        list(iter_pretrain_texts(tmp_path / "x.csv"))


def test_dpo_accepts_strings_and_message_lists(tmp_path):
    path = _write(
        tmp_path / "dpo.jsonl",
        [
            {"prompt": "q1", "chosen": "good", "rejected": "bad"},
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"}],
                "chosen": [{"role": "assistant", "content": "good2"}],
                "rejected": [{"role": "assistant", "content": "bad2"}],
            },
        ],
    )
    a, b = load_dpo(path)
    assert (a.prompt, a.chosen, a.rejected) == ([{"role": "user", "content": "q1"}], "good", "bad")
    assert a.images == [] and a.where.endswith("dpo.jsonl:1")
    assert b.prompt[1] == {"role": "user", "content": "q2"} and b.chosen == "good2"


def test_txt_files_are_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert list(iter_pretrain_texts(tmp_path / "a.txt")) == ["line one\nline two\n"]


def test_packing_covers_every_token_once(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = [f"Document number {i} says hello." * (i % 4 + 1) for i in range(40)]
    stream = tokenize_documents(texts, tokenizer, eot)
    assert (stream == eot).sum() == 40
    ds = PackedDataset(stream, 16, eot)
    targets = torch.cat([ds[i]["targets"] for i in range(len(ds))])
    inputs = torch.cat([ds[i]["input_ids"] for i in range(len(ds))])
    n = len(ds) * 16
    assert torch.equal(inputs, torch.from_numpy(stream[:n].astype(np.int64)))
    assert torch.equal(targets, torch.from_numpy(stream[1 : n + 1].astype(np.int64)))


def test_segments_and_positions_restart_after_each_eot():
    eot = 0
    x = torch.tensor([5, 6, 0, 7, 0, 0, 8, 9])
    seg, pos = segments_and_positions(x, eot)
    assert seg.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 0, 1]


def test_batch_order_is_seeded_resumable_and_rank_sharded():
    a = BatchOrder(50, 4, seed=1)
    seq = [a.next_indices() for _ in range(30)]  # crosses epochs (12 batches per epoch)
    b = BatchOrder(50, 4, seed=1)
    for _ in range(7):
        b.next_indices()
    c = BatchOrder(50, 4, seed=1)
    c.load_state_dict(b.state_dict())
    assert [c.next_indices() for _ in range(23)] == seq[7:]
    r0, r1 = BatchOrder(50, 2, 1, rank=0, world_size=2), BatchOrder(50, 2, 1, rank=1, world_size=2)
    for i in range(12):
        assert r0.next_indices() + r1.next_indices() == seq[i]
    assert sorted(sum(seq[:12], [])) == sorted(set(sum(seq[:12], [])))  # no row twice in an epoch


def test_batch_order_errors_are_clear():
    from train.errors import UserError

    with pytest.raises(UserError, match="needs 8"):
        BatchOrder(5, 8, seed=0)
    order = BatchOrder(50, 4, seed=0)
    with pytest.raises(UserError, match="same data and seed"):
        order.load_state_dict({"epoch": 0, "cursor": 0, "seed": 0, "num_rows": 49})


def test_trl_records_read_like_messages_from_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.data.formats import load_dpo, load_sft

    recs = [
        {"prompt": "2+2?", "completion": "4"},
        {
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "hello"}],
        },
    ]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2?", "completion": "4"}]), tmp_path / "pc.parquet")
    got = load_sft(tmp_path / "pc.jsonl")
    assert got[0].messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert [m["role"] for m in got[1].messages] == ["system", "user", "assistant"]
    assert load_sft(tmp_path / "pc.parquet")[0].messages == got[0].messages

    shared = [{"role": "user", "content": "pick"}]
    implicit = {
        "chosen": shared + [{"role": "assistant", "content": "A"}],
        "rejected": shared + [{"role": "assistant", "content": "B"}],
    }
    (tmp_path / "dpo.jsonl").write_text(json.dumps(implicit) + "\n")
    pair = load_dpo(tmp_path / "dpo.jsonl")[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == (shared, "A", "B")
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "q", "chosen": "A", "rejected": "B"}, {"prompt": "q"}]),
        tmp_path / "dpo.parquet",
    )
    with pytest.raises(DataError, match=r"dpo\.parquet: row 2: missing field 'chosen'"):
        load_dpo(tmp_path / "dpo.parquet")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "only a prompt"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'messages' .* \(or give 'prompt' and 'completion'\)"):
        load_sft(tmp_path / "bad.jsonl")


def test_tokenizer_sample_is_bounded_and_spread_over_every_input(tmp_path):
    from train.data.tokenizer import iter_training_text

    sizes = {"a.jsonl": 3000, "b.jsonl": 1000}
    for name, n in sizes.items():
        (tmp_path / name).write_text(
            "".join(json.dumps({"text": f"{name} doc {i:05d} " + "x" * 40}) + "\n" for i in range(n))
        )
    files = sum((tmp_path / n).stat().st_size for n in sizes)  # --max-bytes counts the input files' bytes
    text = sum(len(t.encode()) for t in iter_training_text([tmp_path / n for n in sizes]))
    kept = list(iter_training_text([tmp_path / n for n in sizes], max_bytes=files // 10))
    got = sum(len(t.encode()) for t in kept)
    assert got <= files // 10 and abs(got - text / 10) <= 2 * 60  # a tenth of the text, within two documents
    for name, n in sizes.items():
        idx = [int(t.split()[2]) for t in kept if t.startswith(name)]
        assert abs(len(idx) - n / 10) <= 2  # each input its share
        assert min(idx) < n / 10 and max(idx) > n * 0.9  # from its beginning to its end
