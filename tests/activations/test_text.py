"""Text sources and packing: what goes into the model is exactly the documents, in contexts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from activations.text import (
    TextConfig,
    check_source,
    context_batches,
    iter_contexts,
    open_documents,
    special_ids,
    token_batches,
)
from sae.errors import UserError
from tests.helpers import make_docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_lm_dir))


def test_packing_is_bos_plus_the_document_stream_separated_by_eos(tmp_path, tokenizer):
    docs = make_docs(tmp_path / "d", 12)
    cfg = TextConfig(dataset=str(docs), context_size=16, shuffle_buffer=0)
    bos, eos = special_ids(tokenizer)
    contexts = list(iter_contexts(cfg, tokenizer))
    assert contexts and all(len(c) == 16 and c[0] == bos for c in contexts)
    stream: list[int] = []
    for path in sorted(docs.iterdir()):
        stream += tokenizer(path.read_text(), add_special_tokens=False)["input_ids"] + [eos]
    bodies = [t for c in contexts for t in c[1:]]
    assert bodies == stream[: len(bodies)]
    assert len(stream) - len(bodies) < 15  # only the incomplete tail is dropped


def test_same_seed_same_contexts_other_seed_other_order(tmp_path, tokenizer):
    docs = make_docs(tmp_path / "d", 30)
    a = list(token_batches(TextConfig(dataset=str(docs), context_size=16, seed=1), tokenizer))
    b = list(token_batches(TextConfig(dataset=str(docs), context_size=16, seed=1), tokenizer))
    c = list(token_batches(TextConfig(dataset=str(docs), context_size=16, seed=2), tokenizer))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=False))
    assert a[0].shape == (32, 16) and a[0].dtype == torch.long


def test_ranks_take_disjoint_slices_whose_union_is_the_stream(tmp_path, tokenizer):
    docs = make_docs(tmp_path / "d", 20)
    cfg = TextConfig(dataset=str(docs), context_size=16, batch_size=5)
    whole = {int(s): t for b in context_batches(cfg, tokenizer) for s, t in zip(*b, strict=True)}
    parts = [
        {
            int(s): t
            for b in context_batches(cfg, tokenizer, rank=r, world_size=3)
            for s, t in zip(*b, strict=True)
        }
        for r in range(3)
    ]
    assert sum(len(p) for p in parts) == len(whole)
    for p in parts:
        for s, t in p.items():
            assert torch.equal(t, whole[s])
    resumed = [int(s) for b in context_batches(cfg, tokenizer, start=7) for s in b.sequence]
    assert resumed == sorted(whole)[7:]


def test_jsonl_parquet_and_dataset_folders(tmp_path):
    rows = [{"text": f"doc {i}", "other": i} for i in range(5)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(open_documents(TextConfig(dataset=str(jsonl)))) == [r["text"] for r in rows]

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "hub_like"  # a folder of data files goes through load_dataset(name)
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
    assert list(open_documents(TextConfig(dataset=str(folder)))) == [r["text"] for r in rows]
    pq.write_table(pa.table({"ids": [[1, 2, 3], [4, 5]]}), tmp_path / "tok.parquet")
    got = list(
        open_documents(TextConfig(dataset=str(tmp_path / "tok.parquet"), token_column="ids"))
    )
    assert got == [[1, 2, 3], [4, 5]]


def test_pretokenized_documents_are_packed_without_a_tokenizer_call(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"ids": [[5, 6, 7], [8, 9]]}), tmp_path / "tok.parquet")
    cfg = TextConfig(dataset=str(tmp_path / "tok.parquet"), token_column="ids", context_size=4)
    bos, eos = special_ids(tokenizer)
    assert list(iter_contexts(cfg, tokenizer)) == [[bos, 5, 6, 7], [bos, eos, 8, 9]]


def test_text_files_by_paragraph_and_line(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    by_par = list(
        open_documents(TextConfig(dataset=str(tmp_path / "a.txt"), sample_by="paragraph"))
    )
    by_line = list(open_documents(TextConfig(dataset=str(tmp_path / "a.txt"), sample_by="line")))
    assert by_par == ["one\ntwo", "three\n"]
    assert by_line == ["one", "two", "three"]


def test_bundled_corpus_is_the_default_source():
    first = next(iter(open_documents(TextConfig())))
    assert isinstance(first, str) and first.strip()


def test_missing_text_column_names_the_columns(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    with pytest.raises(UserError, match=r"no text column 'text'.*content, id"):
        check_source(TextConfig(dataset=str(path)))


def test_unreadable_and_missing_files_are_user_errors(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(UserError, match="cannot read"):
        check_source(TextConfig(dataset=str(bad)))
    with pytest.raises(UserError, match="no such file"):
        check_source(TextConfig(dataset=str(tmp_path / "nope.jsonl")))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="cannot read"):
        check_source(TextConfig(dataset=str(tmp_path / "latin1.txt")))
    with pytest.raises(UserError, match="splits train and validation"):
        check_source(TextConfig(split="test"))
