"""Corpora as streams of documents, cut into blocks that worker processes read and tokenize on their own.

Inputs (files, or directories searched for them):
- `.txt`: one document per file, read whole;
- `.jsonl` / `.jsonl.gz`: one JSON object per line, the document in a string field (`text` by default);
- `.parquet`: a string column (`text` by default), read one row group at a time;
- a directory written by Hugging Face `datasets` (`Dataset.save_to_disk`): its Arrow files, read through
  a memory map, a run of record batches at a time.

`plan_blocks` is the cheap part and runs in the main process: it only finds where blocks start and end
(jsonl blocks end at a line end, about `block_bytes` apart); the blocks follow from the files alone, never
from the number of workers, so a prepare with 1 or 8 workers writes the same bytes. `read_block` is the
expensive part (decode, parse, check, tokenize) and runs in a worker. A bad record is reported with the
record number *within its block* (the worker does not know how many lines came before), and the main
process, which does, names the file and the line.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
HF_STATE = "state.json"  # what marks a `datasets` save_to_disk directory


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # txt | jsonl | jsonl.gz | parquet | arrow

    def stat(self) -> list:
        """What says the source is unchanged: each file's size and modification time."""
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files()]

    def files(self) -> list[Path]:
        return arrow_files(self.path) if self.kind == "arrow" else [self.path]

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files())


def kind_of(path: Path) -> str | None:
    name = path.name
    if path.is_dir() and (path / HF_STATE).is_file():
        return "arrow"
    for suffix in (".jsonl.gz", ".jsonl", ".txt", ".parquet"):
        if name.endswith(suffix):
            return suffix[1:]
    return None


def find_sources(paths: list[str | Path]) -> list[Source]:
    """The inputs in a fixed order: files as given, directories searched (sorted) for supported files."""
    out: list[Source] = []
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise DataError(f"{p}: data file not found")
        kind = kind_of(p)
        if kind is not None:
            out.append(Source(p, kind))
        elif p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                r = Path(root)
                if (r / HF_STATE).is_file():
                    found.append(Source(r, "arrow"))
                    dirs.clear()
                    continue
                found += [Source(r / f, k) for f in sorted(files) if (k := kind_of(r / f)) is not None]
            if not found:
                raise DataError(f"{p}: no {', '.join(SUFFIXES)} files or `datasets` directories in it")
            out += found
        else:
            raise DataError(f"{p}: unsupported data file; use {', '.join(SUFFIXES)} or a `datasets` directory")
    return out


def arrow_files(directory: Path) -> list[Path]:
    try:
        state = json.loads((directory / HF_STATE).read_text())
        files = [directory / f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{directory / HF_STATE}: not a `datasets` save_to_disk state file") from None
    if state.get("_indices_data_files"):
        raise DataError(f"{directory}: a dataset with an indices mapping; save it after `.flatten_indices()`")
    for f in files:
        if not f.is_file():
            raise DataError(f"{directory}: its state.json names {f.name}, which is missing")
    return files


@dataclass(frozen=True)
class Block:
    """One unit of work: where to read it, and (jsonl.gz only) the decompressed lines themselves."""

    source: int  # index into the source list
    index: int  # block number within the source
    kind: str
    path: str
    start: int  # jsonl: byte offset; parquet: row group; arrow: first record batch; txt: 0
    stop: int  # exclusive
    field: str
    disk_bytes: int  # its share of the input files' size (for the progress bar)
    data: bytes | None = None


def plan_blocks(sources: list[Source], field: str, block_bytes: int, skip_to: tuple[int, int] = (0, 0)):
    """Every block of every source in order, from block `skip_to` = (source, block) on."""
    for si, src in enumerate(sources):
        if si < skip_to[0]:
            continue
        first = skip_to[1] if si == skip_to[0] else 0
        for bi, block in enumerate(_source_blocks(si, src, field, block_bytes, first)):
            if bi >= first:
                yield block


def _source_blocks(si: int, src: Source, field: str, block_bytes: int, first: int) -> Iterator[Block]:
    path = str(src.path)
    if src.kind == "txt":
        yield Block(si, 0, "txt", path, 0, src.size(), field, src.size())
    elif src.kind == "jsonl":
        size, start, bi = src.size(), 0, 0
        with open(path, "rb") as f:
            while start < size:
                f.seek(min(start + block_bytes, size))
                f.readline()  # to the end of the line the cut falls in
                stop = min(f.tell(), size)
                yield Block(si, bi, "jsonl", path, start, stop, field, stop - start)
                start, bi = stop, bi + 1
    elif src.kind == "jsonl.gz":
        with open(path, "rb") as raw, gzip.open(raw, "rb") as f:
            bi, start, read = 0, 0, 0
            try:
                while chunk := f.read(block_bytes):
                    chunk += f.readline()
                    disk, read = raw.tell() - read, raw.tell()
                    # blocks before the one to resume from are decompressed (to find them) but not sent
                    data = chunk if bi >= first else b""
                    yield Block(si, bi, "jsonl", path, start, start + len(chunk), field, disk, data)
                    start, bi = start + len(chunk), bi + 1
            except (OSError, EOFError) as e:
                raise DataError(f"{path}: not a readable gzip file ({e})") from None
    elif src.kind == "parquet":
        pf = _parquet(src.path)
        if field:  # a pretraining corpus: its text column (SFT/DPO records are whole rows)
            _text_column(pf.schema_arrow, field, path)
        meta, size = pf.metadata, src.size()
        for rg in range(meta.num_row_groups):
            share = size * meta.row_group(rg).num_rows // max(1, meta.num_rows)
            yield Block(si, rg, "parquet", path, rg, rg + 1, field, share)
    else:  # arrow: runs of record batches of about block_bytes
        bi = 0
        for f in src.files():
            batches = _arrow_batch_sizes(f, field)
            start, acc, size = 0, 0, f.stat().st_size
            for k, nbytes in enumerate(batches):
                acc += nbytes
                if acc >= block_bytes or k == len(batches) - 1:
                    share = size * (k + 1 - start) // len(batches)
                    yield Block(si, bi, "arrow", str(f), start, k + 1, field, share)
                    start, acc, bi = k + 1, 0, bi + 1


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _text_column(schema, field: str, where: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        names = ", ".join(schema.names)
        raise DataError(f"{where}: no column '{field}' (columns: {names}); choose one with --text-field")
    t = schema.field(field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise DataError(f"{where}: column '{field}' holds {t}, not text; choose a text column with --text-field")


def _open_arrow(path: Path):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r"))
    except Exception as e:
        raise DataError(f"{path}: not a readable Arrow stream file ({e})") from None


def _arrow_batch_sizes(path: Path, field: str) -> list[int]:
    reader = _open_arrow(path)
    if not field:
        return [b.nbytes for b in reader]
    _text_column(reader.schema, field, str(path))
    return [b.column(field).nbytes for b in reader]


# --- in the worker -------------------------------------------------------------------------------------


class RecordError(Exception):
    """A bad record, numbered within its block (0-based); the main process turns it into a DataError."""

    def __init__(self, record: int, message: str):
        super().__init__(record, message)
        self.record, self.message = record, message


def parse_json_line(raw: bytes) -> dict | None:
    """One jsonl line as an object (None for a blank line); what is wrong with it raises ValueError."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start + 1} of the line)") from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "\\u" in line:  # an escaped lone surrogate decodes to a string no tokenizer can encode
        try:
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff)") from None
    return rec


def block_texts(block: Block) -> tuple[list[str], int]:
    """The documents of a block and how many records (lines, rows) it spans."""
    if block.kind == "txt":
        raw = Path(block.path).read_bytes()
        try:
            return [raw.decode("utf-8")], 1
        except UnicodeDecodeError as e:
            raise RecordError(0, f"not UTF-8 text (byte {e.start + 1})") from None
    if block.kind == "jsonl":
        recs, n = block_records(block)
        texts = []
        for i, rec in recs:
            text = rec.get(block.field)
            if not isinstance(text, str):
                what = "is missing" if block.field not in rec else "must be a string"
                raise RecordError(i, f"field '{block.field}' {what}")
            texts.append(text)
        return texts, n
    if block.kind == "parquet":
        column = _parquet(Path(block.path)).read_row_group(block.start, columns=[block.field]).column(0)
    else:
        reader = _open_arrow(Path(block.path))
        batches = [b for k, b in enumerate(reader) if block.start <= k < block.stop]
        column = [b.column(block.field) for b in batches]
        import pyarrow as pa

        column = pa.chunked_array(column) if column else pa.chunked_array([], pa.string())
    if column.null_count:
        first_null = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
        raise RecordError(first_null, f"column '{block.field}' is null")
    texts = column.to_pylist()
    return texts, len(texts)


def _read_lines(block: Block) -> list[bytes]:
    if block.data is not None:
        raw = block.data
    else:
        with open(block.path, "rb") as f:
            f.seek(block.start)
            raw = f.read(block.stop - block.start)
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def block_records(block: Block) -> tuple[list[tuple[int, dict]], int]:
    """The whole records of a block (jsonl objects, parquet/Arrow rows without their null fields), each with
    its number within the block, and how many records the block spans (SFT and DPO data)."""
    if block.kind == "txt":
        raise RecordError(0, "a .txt file holds pretraining text, not conversations")
    if block.kind == "jsonl":
        lines, out = _read_lines(block), []
        for i, line in enumerate(lines):
            try:
                rec = parse_json_line(line)
            except ValueError as e:
                raise RecordError(i, str(e)) from None
            if rec is not None:
                out.append((i, rec))
        return out, len(lines)
    if block.kind == "parquet":
        table = _parquet(Path(block.path)).read_row_group(block.start)
        rows = table.to_pylist()
    else:
        reader = _open_arrow(Path(block.path))
        rows = [r for k, b in enumerate(reader) if block.start <= k < block.stop for r in b.to_pylist()]
    return [(i, {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(rows)], len(rows)


def tokenize_block(block: Block, tokenizer, eot_id: int) -> dict:
    """The block's documents as one token array, each document followed by `eot_id`."""
    texts, n_records = block_texts(block)
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    lens = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    tokens = np.empty(int(lens.sum()), dtype=np.uint32)
    ends = np.cumsum(lens)
    for e, end in zip(encodings, ends):
        tokens[end - len(e.ids) - 1 : end - 1] = e.ids
    tokens[ends - 1] = eot_id
    nbytes = block.stop - block.start if block.kind == "jsonl" else sum(len(t.encode()) for t in texts)
    return {"tokens": tokens, "doc_lens": lens, "records": n_records, "bytes": nbytes}


def record_where(block: Block, record: int, records_before: int) -> str:
    """FILE:LINE for jsonl, FILE: row N otherwise (1-based, counted over the whole source)."""
    n = records_before + record + 1
    if block.kind == "jsonl":
        return f"{block.path}:{n}"
    if block.kind == "txt":
        return block.path
    return f"{block.path}: row {n}"


def iter_documents(paths: list[str | Path], field: str = "text", block_bytes: int = 1 << 22) -> Iterator[str]:
    """Every document of the inputs, in order, read in this process (tokenizer training, small tools)."""
    sources = find_sources(paths)
    records: dict[str, int] = {}
    for block in plan_blocks(sources, field, block_bytes):
        try:
            texts, n = block_texts(block)
        except RecordError as e:
            raise DataError(f"{record_where(block, e.record, records.get(block.path, 0))}: {e.message}") from None
        records[block.path] = records.get(block.path, 0) + n
        yield from texts
