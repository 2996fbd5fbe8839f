"""Reading pools: every bad row is quarantined with file, line, field and reason; none is lost."""

import json

import pytest
from datasets import Dataset

from lmmixup_hf.data.io import PoolFormatError, Quarantine, read_pool, read_stage_data, write_stage_data
from lmmixup_hf.data.schema import make_id

GOOD = {"prompt": "What is the boiling point of water?", "completion": "100 degrees Celsius at sea level."}


def _jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_rows_are_quarantined_with_exact_reasons(tmp_path):
    lines = [
        json.dumps({**GOOD, "id": "a"}).encode(),  # 1 good
        b'{"prompt": "broken", ',  # 2 malformed JSON
        json.dumps({"prompt": "no answer here"}).encode(),  # 3 missing completion
        json.dumps({"prompt": "  ", "completion": "x"}).encode(),  # 4 empty prompt
        json.dumps({"prompt": 42, "completion": "x"}).encode(),  # 5 wrong type
        b'{"prompt": "caf\xe9", "completion": "x"}',  # 6 invalid UTF-8 (latin-1 byte)
        json.dumps({**GOOD, "id": "a", "completion": "other"}).encode(),  # 7 duplicate id
        json.dumps({"prompt": "long " * 50, "completion": "x"}).encode(),  # 8 too long
        json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}).encode(),  # 9 good (alpaca)
        json.dumps(["not", "an", "object"]).encode(),  # 10 not an object
        json.dumps({**GOOD, "id": "b", "task_type": "riddle"}).encode(),  # 11 unknown task type
    ]
    path = _jsonl(tmp_path / "pool.jsonl", lines)
    q = Quarantine()
    ds = read_pool(path, quarantine=q, max_chars=200)

    assert ds["id"] == ["a", make_id("Name a colour.", "Blue.")]
    got = {r.line: (r.field, r.reason) for r in q.rows}
    assert got[2][0] is None and got[2][1].startswith("malformed JSON")
    assert got[3] == ("completion", "missing (looked for completion, output, answer, response, target)")
    assert got[4] == ("prompt", "empty")
    assert got[5] == ("prompt", "expected a string, got int")
    assert got[6][0] is None and got[6][1].startswith("invalid UTF-8")
    assert got[7] == ("id", "duplicate id 'a' (first seen at line 1)")
    assert got[8][0] == "prompt+completion" and got[8][1].startswith("too long")
    assert got[10] == (None, "expected a JSON object, got list")
    assert got[11][0] == "task_type" and "unknown task type 'riddle'" in got[11][1]
    assert all(r.file == str(path) for r in q.rows)
    # no row is silently lost
    assert len(ds) + len(q) == len(lines)
    assert q.summary().startswith("rejected 9 rows")


def test_field_mapping_and_stable_ids(tmp_path):
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"question": "2+2?", "answer": "4", "source": "math", "task_type": "qa_mixup", "extra_field": [1, 2]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    ds = read_pool(path)
    assert ds["prompt"] == ["Translate to French.\n\ncat", "2+2?", "Hi"]
    assert ds["completion"] == ["chat", "4", "Hello!"]
    assert ds["source"] == ["mixed", "math", "mixed"]
    assert ds["task_type"] == ["qa", "qa", "qa"]
    assert ds["extra_field"] == [None, [1, 2], None] and ds["extra"] == [None] * 3  # a real column now
    again = read_pool(path)
    assert again["id"] == ds["id"]  # stable across reads


def test_parquet_saved_dataset_and_stage_folder(tmp_path):
    src = Dataset.from_list([{**GOOD, "source": "s"}, {"prompt": "p2", "completion": ""}])
    src.to_parquet(str(tmp_path / "pool.parquet"))
    q = Quarantine()
    assert len(read_pool(tmp_path / "pool.parquet", quarantine=q)) == 1
    assert q.rows[0].line == 2 and q.rows[0].field == "completion"

    src.save_to_disk(str(tmp_path / "saved"))
    assert read_pool(tmp_path / "saved")["prompt"] == [GOOD["prompt"]]

    ds = read_pool(tmp_path / "pool.parquet")
    write_stage_data(ds, tmp_path / "stage")
    write_stage_data(ds, tmp_path / "stage")  # rewriting replaces, never duplicates
    assert read_stage_data(tmp_path / "stage")["id"] == ds["id"]
    assert read_pool(tmp_path / "stage")["id"] == ds["id"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("binary.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a pool"),
        ("empty.jsonl", b"", "no records"),
        ("list.json", b'{"not": "a list"}', "expected a JSON array"),
        ("bad.json", b"[{1, 2}", "malformed JSON"),
        ("notes.txt", b"hello", "unsupported file type"),
    ],
)
def test_not_a_pool_is_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PoolFormatError, match=message):
        read_pool(path)


def test_missing_file_and_offline_hub_id(tmp_path):
    with pytest.raises(PoolFormatError, match="no such file"):
        read_pool(tmp_path / "absent.jsonl")
    with pytest.raises(PoolFormatError, match="could not load from the Hub"):
        read_pool("some-org/some-pool")


def test_large_jsonl_streams_in_batches(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(25_000):
            f.write(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) + "\n")
    ds = read_pool(path)
    assert len(ds) == 25_000 and ds[24_999]["prompt"] == "question 24999"
    assert ds.cache_files  # memory-mapped from disk, not held in Python lists


def test_normalize_core_on_in_memory_rows():
    from lmmixup_hf.data.io import normalize

    rows = Dataset.from_list(
        [
            {"instruction": "Add.", "input": "2+2", "output": "4", "score": 0.5},
            {"instruction": "", "input": None, "output": "x", "score": 0.1},
            {"instruction": "Say hi.", "input": None, "output": "Hi", "score": 0.9},
        ]
    )
    ds, rejected = normalize(rows, default_source="alpaca")
    assert ds["prompt"] == ["Add.\n\n2+2", "Say hi."] and ds["source"] == ["alpaca", "alpaca"]
    assert ds["score"] == [0.5, 0.9]  # an unknown field of one type: a real column
    assert [(r.line, r.field) for r in rejected.rows] == [(2, "prompt")]


def test_a_failed_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    """A full disk mid-write raises with the old output intact and no ``.*.tmp-*`` left behind."""
    import errno

    import pyarrow.parquet as pq

    from lmmixup_hf.data.io import write_json, write_jsonl
    from lmmixup_hf.pipeline.workflow import StageRun

    ds = Dataset.from_list([{"id": "a", "prompt": "p", "completion": "c"}])
    write_stage_data(ds, tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(OSError):
        write_stage_data(ds, tmp_path)
    with pytest.raises(OSError):
        StageRun("rate", tmp_path / "stage").finish(ds, counts={"rows": 1})

    def rows():
        yield {"id": "a"}
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_jsonl(tmp_path / "failed.jsonl", rows())
    with pytest.raises(TypeError):
        write_json(tmp_path / "summary.json", {"bad": float("nan"), object(): 1})  # keys must be strings
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert [r["id"] for r in read_stage_data(tmp_path)] == ["a"]  # the last good output is untouched


def _rows_for_both_readers() -> list[dict]:
    """Rows with one column layout (as parquet has) and every kind of bad row the contract knows."""
    base = {"prompt": None, "instruction": None, "input": None, "completion": None, "output": None}
    rows = [
        {**GOOD, "id": "a", "task_type": "qa_mixup"},  # 1 good
        {"completion": "no prompt"},  # 2 missing prompt
        {"prompt": "no completion"},  # 3 missing completion
        {"prompt": "  \t", "completion": "x"},  # 4 empty prompt
        {"prompt": "p", "completion": " "},  # 5 empty completion
        {"prompt": "long " * 50, "completion": "x"},  # 6 too long
        {**GOOD, "id": "a", "completion": "other"},  # 7 duplicate id
        {"instruction": "Name a colour.", "input": "Be brief.", "output": "Blue."},  # 8 alpaca, input appended
        {"instruction": "Name a shape.", "input": "", "output": "Circle."},  # 9 alpaca, empty input
        {"prompt": "p", "completion": "c", "task_type": "poetry"},  # 10 unknown task type
        {"prompt": "p", "completion": "c", "source": "dolly"},  # 11 good, own source
        {"prompt": "p", "completion": "c"},  # 12 duplicate of 11's derived id
        {"prompt": "q", "completion": "c", "id": ""},  # 13 empty id: derived
    ]
    return [
        {**base, "id": None, "source": None, "task_type": None, **r, "rating": {"score": i}}
        for i, r in enumerate(rows)
    ]


def test_arrow_reader_matches_the_row_reader(tmp_path):
    """Parquet is validated with pyarrow.compute, JSONL row by row: same rows, same quarantine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows_for_both_readers()
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet", row_group_size=4)
    q_rows, q_arrow = Quarantine(), Quarantine()
    by_rows = read_pool(tmp_path / "pool.jsonl", quarantine=q_rows, max_chars=200)
    by_arrow = read_pool(tmp_path / "pool.parquet", quarantine=q_arrow, max_chars=200)
    assert [(r.line, r.field, r.reason) for r in q_arrow.rows] == [(r.line, r.field, r.reason) for r in q_rows.rows]
    assert [r.line for r in q_arrow.rows] == [2, 3, 4, 5, 6, 7, 10, 12]
    assert by_arrow.column_names[:6] == ["id", "prompt", "completion", "source", "task_type", "extra"]
    for col in ("id", "prompt", "completion", "source", "task_type", "rating"):
        assert by_arrow[col] == by_rows[col], col
    assert by_arrow["prompt"][1] == "Name a colour.\n\nBe brief."


def test_arrow_reader_type_errors_and_passthrough(tmp_path):
    """Wrong types are quarantined with the per-row reader's reasons; list columns stay Arrow lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt": ["a", "b", "c"],
            "completion": ["x", "y", "z"],
            "id": [1, 2, 1],
            "source": ["s", None, "t"],
            "embedding": pa.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, tmp_path / "pool.parquet")
    q = Quarantine()
    ds = read_pool(tmp_path / "pool.parquet", quarantine=q)
    assert ds["id"] == ["1", "2"] and ds["source"] == ["s", "pool"]
    assert [(r.line, r.field, r.reason) for r in q.rows] == [(3, "id", "duplicate id '1' (first seen at line 1)")]
    assert ds.data.schema.field("embedding").type == pa.list_(pa.float32())
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1.5, None]}), tmp_path / "bad.parquet")
    q = Quarantine()
    with pytest.raises(PoolFormatError, match="all 2 rows are unusable"):
        read_pool(tmp_path / "bad.parquet", quarantine=q)
    assert [(r.field, r.reason) for r in q.rows] == [
        ("completion", "expected a string, got float"),
        ("completion", "missing (looked for completion, output, answer, response, target)"),
    ]


def test_stage_data_is_written_in_large_row_groups(tmp_path):
    """Stage outputs are plain pyarrow parquet: one row group per ROW_GROUP_ROWS, streamed input works."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmmixup_hf.data import io

    batches = (pa.table({"id": [f"{b}-{i}" for i in range(1000)], "x": list(range(1000))}) for b in range(5))
    (path,) = write_stage_data(batches, tmp_path / "stage")
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 5000 and meta.num_row_groups == 1 and io.ROW_GROUP_ROWS >= 5000
    paths = write_stage_data(pa.table({"x": list(range(10))}), tmp_path / "stage", shard_rows=4)
    assert [pq.ParquetFile(p).metadata.num_rows for p in paths] == [4, 4, 2]
    assert read_stage_data(tmp_path / "stage")["x"] == list(range(10))


def test_parquet_streams_in_batches_with_duplicates_across_them(tmp_path, monkeypatch):
    """Batches of 1,024 rows: a duplicate id in a later batch names the first line; ingest writes
    every good row once and the returned dataset equals what it wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmmixup_hf.data import arrow_files
    from lmmixup_hf.pipeline.ingest import IngestArgs, ingest

    monkeypatch.setattr(arrow_files, "BATCH_BYTES", 1)  # the smallest batch: 1,024 rows
    n = 2500
    ids = [f"r{i}" for i in range(n)]
    ids[2100], ids[1500] = "r7", "r1499"  # duplicates in the 3rd and 2nd batch
    pq.write_table(
        pa.table({"id": ids, "prompt": [f"p{i}" for i in range(n)], "completion": ["c"] * n}),
        tmp_path / "pool.parquet",
    )
    ds = ingest(IngestArgs(input=str(tmp_path / "pool.parquet"), out=str(tmp_path / "out")))
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (1501, "duplicate id 'r1499' (first seen at line 1500)"),
        (2101, "duplicate id 'r7' (first seen at line 8)"),
    ]
    assert len(ds) == n - 2 and read_stage_data(tmp_path / "out")["id"] == ds["id"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["rows_out"] == n - 2 and manifest["counts"]["rows_in"] == n
