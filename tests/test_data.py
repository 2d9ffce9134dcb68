"""oryx.data: embedded corpus splits, offline tokenizers, user data sources, token cache and packing."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import oryx.data.sources as sources
import oryx.data.tokenizer as tokenizer_module
from oryx.data import (
    EOT,
    SPLITS,
    Document,
    PackedDataset,
    TokenShards,
    byte_tokenizer,
    gpt2_tokenizer,
    iter_documents,
    load_documents,
    load_text,
    load_tokenizer,
    load_tokens,
    train_bpe,
)


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def small_bpe():
    """A 600-id BPE trained on ~1 MB of the train split (fast enough for every run)."""
    return train_bpe([load_text("train")[:1_000_000]], vocab_size=600)


def sentences(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` random real sentences (20-300 chars) from a corpus split."""
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", load_text(split)) if 20 <= len(s.strip()) <= 300]
    return random.Random(seed).sample(found, n)


def expected_stream(tok, texts: list[str]) -> list[int]:
    """The documented packing: each non-empty document's ids followed by eos."""
    return [i for t in texts if t for i in [*tok(t).input_ids, tok.eos_token_id]]


# ----------------------------------------------------------------------------------------------- corpus


def test_splits_hold_whole_distinct_documents():
    docs = {split: load_documents(split) for split in SPLITS}
    assert all(docs.values()), "every split has documents"
    assert all(isinstance(d, Document) and d.text.strip() for ds in docs.values() for d in ds)
    titles = {split: {d.title for d in ds} for split, ds in docs.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not titles[a] & titles[b], f"{a} and {b} share documents"
    assert {"THE TEMPEST", "THE SONNETS"} <= titles["validation"]
    assert {d.source for d in docs["train"]} == {"shakespeare", "kjv", "austen"}


def test_held_out_text_does_not_occur_in_train():
    train = load_text("train")
    rng = random.Random(0)
    for split in ("validation", "test"):
        for doc in load_documents(split):
            for _ in range(8):  # 200-char windows: long enough to be unique unless copied
                start = rng.randrange(0, len(doc.text) - 200)
                window = doc.text[start : start + 200]
                assert window not in train, f"{doc.title!r} text occurs in train: {window[:60]!r}"


def test_brown_is_an_out_of_domain_test_split_that_training_never_sees():
    docs = load_documents("test", corpus="brown")
    assert len(docs) >= 100 and {d.source for d in docs} == {"brown"}
    genres = {d.title.split("(")[1].rstrip(")") for d in docs}  # "Brown a01 (press: reportage)"
    assert len(genres) == 15 and {"learned", "fiction: science", "press: reportage"} <= genres
    train = load_text("train")
    rng = random.Random(1)
    for doc in rng.sample(docs, 20):
        assert "/" not in doc.text.split()[0] and "``" not in doc.text, "tags and quote tokens are gone"
        start = rng.randrange(0, len(doc.text) - 200)
        assert doc.text[start : start + 200] not in train, f"{doc.title!r} text occurs in prose's train split"
    with pytest.raises(ValueError, match=r"unknown split 'train' of corpus 'brown'; choose one of test"):
        load_documents("train", corpus="brown")


def test_brown_loads_as_a_token_source(small_bpe):
    docs = load_documents("test", corpus="brown")
    ids = np.asarray(load_tokens("brown:test", small_bpe))
    ends = np.flatnonzero(ids == small_bpe.eos_token_id)
    assert len(ends) == len(docs), "one end-of-text per document"
    assert small_bpe.decode(ids[: ends[0]].tolist()) == docs[0].text


def test_brown_detokenizer_against_hand_written_sentences(monkeypatch):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "build_corpus.py")
    spec = importlib.util.spec_from_file_location("build_corpus", script)
    build = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_corpus", build)  # its dataclasses look their module up there
    spec.loader.exec_module(build)
    tagged = "``/`` It's/pps+bez over/rp ''/'' ,/, he/pps said/vbd (/( twice/rb )/) ;/. **zg/fw-nn then/rb --/-- "
    tagged += "gone/vbn !/."
    assert build.detokenize(tagged) == '"It\'s over", he said (twice); then -- gone!'
    assert build.detokenize("\tThe/at U.S./np-tl paid/vbd $1,000/nns ./.\n") == "The U.S. paid $1,000."


def test_load_text_joins_documents_and_bad_names_raise():
    docs = load_documents("validation")
    assert load_text("validation") == "\n\n".join(d.text for d in docs)
    load_documents("train").clear()  # callers get a copy; the cache is unaffected
    assert load_documents("train")
    with pytest.raises(ValueError, match=r"unknown split 'valid'.*train, validation, test"):
        load_documents("valid")
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        load_text("train", corpus="wiki")


# ----------------------------------------------------------------------------------------------- tokenizers


def test_gpt2_ids_match_the_original(gpt2):
    assert len(gpt2) == 50257 and gpt2.eos_token_id == gpt2.bos_token_id == 50256
    assert gpt2("Hello world").input_ids == [15496, 995]
    assert gpt2(" the").input_ids == [262]
    assert gpt2(f"a{EOT}b").input_ids == [64, 50256, 65]
    text = "  Hello,  world!\n\n\tÜmlaut — 日本語 🙂 ok "
    assert gpt2.decode(gpt2(text).input_ids) == text


def test_trained_bpe_round_trips_real_sentences(small_bpe):
    assert len(small_bpe) == 600 and small_bpe.convert_ids_to_tokens(small_bpe.eos_token_id) == EOT
    for sentence in sentences("test", 50):
        ids = small_bpe(sentence).input_ids
        assert small_bpe.decode(ids) == sentence
        assert len(ids) < len(sentence.encode())  # it learned merges
    odd = "naïve café ☃ \x00\t tabs"  # bytes never seen in training still round trip
    assert small_bpe.decode(small_bpe(odd).input_ids) == odd


def test_byte_tokenizer_is_one_id_per_byte():
    tok = byte_tokenizer()
    text = "héllo\x00\x7f ☃"
    assert len(tok) == 257 and tok.eos_token_id == 256
    assert tok(text).input_ids == list(text.encode("utf-8"))
    assert tok.decode(tok(text).input_ids) == text


@pytest.mark.parametrize("which", ["gpt2", "bpe", "byte"])
def test_saved_tokenizer_loads_with_auto_tokenizer(tmp_path, gpt2, small_bpe, which):
    tok = {"gpt2": gpt2, "bpe": small_bpe, "byte": byte_tokenizer()}[which]
    tok.save_pretrained(tmp_path)
    text = sentences("validation", 1)[0] + EOT
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert loaded(text).input_ids == tok(text).input_ids
        assert loaded.eos_token == EOT and loaded.eos_token_id == tok.eos_token_id
    from_file = load_tokenizer(tmp_path / "tokenizer.json")
    assert from_file(text).input_ids == tok(text).input_ids and from_file.eos_token_id == tok.eos_token_id


def test_load_tokenizer_trains_bpe_once_then_reads_the_cache(tmp_path, monkeypatch):
    few = load_documents("train")[:3]  # keep the test fast: train on three documents
    monkeypatch.setattr(tokenizer_module, "load_documents", lambda split: few)
    first = load_tokenizer("bpe:400", cache_dir=tmp_path)
    assert len(first) == 400

    def fail(*args, **kwargs):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(tokenizer_module, "train_bpe", fail)
    again = load_tokenizer("bpe:400", cache_dir=tmp_path)
    text = sentences("test", 1)[0]
    assert again(text).input_ids == first(text).input_ids
    assert [p.name for p in (tmp_path / "tokenizers").iterdir() if p.name.startswith(".tmp")] == []


def test_load_tokenizer_bad_specs():
    with pytest.raises(ValueError, match="must be an integer"):
        load_tokenizer("bpe:lots")
    with pytest.raises(ValueError, match=r"unknown tokenizer 'no/such/dir'.*'gpt2'"):
        load_tokenizer("no/such/dir")
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(["text"], vocab_size=100)


# ----------------------------------------------------------------------------------------------- user data


def test_text_file_and_folder(tmp_path, gpt2):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    texts = {"b.txt": "Second document.\n", "a.txt": "First document,\nwith two lines.\n", "sub/c.txt": "Third."}
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "notes.md").write_text("ignored: not .txt/.jsonl")
    tokens = load_tokens(folder, gpt2, cache_dir=tmp_path / "cache")
    ordered = [texts["a.txt"], texts["b.txt"], texts["sub/c.txt"]]  # sorted paths
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected_stream(gpt2, ordered)
    assert list(iter_documents(folder)) == ordered
    single = load_tokens(folder / "a.txt", gpt2, cache_dir=tmp_path / "cache")
    assert single.tolist() == expected_stream(gpt2, [texts["a.txt"]])


def test_long_text_file_is_read_in_pieces_as_one_document(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 100)  # many pieces and batches from a small file
    monkeypatch.setattr(sources, "BATCH_CHARS", 250)
    text = "".join(f"line {i} of a long file\n" for i in range(200))
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "short.txt").write_text("tail")
    tok = byte_tokenizer()  # byte ids do not depend on where the text is cut
    tokens = load_tokens(tmp_path, tok, cache_dir=tmp_path / "cache")
    assert tokens.tolist() == expected_stream(tok, [text, "tail"])


def test_jsonl_with_text_field(tmp_path, gpt2):
    rows = [{"id": 1, "body": "One row."}, {"id": 2, "body": ""}, {"id": 3, "body": f"Third, after an empty one{EOT}"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank lines are skipped
    tokens = load_tokens(path, gpt2, text_field="body", cache_dir=tmp_path / "cache")
    assert tokens.tolist() == expected_stream(gpt2, [r["body"] for r in rows])  # empty doc: no lone eos


def test_gpt2_bulk_encoding_matches_the_hf_tokenizer(tmp_path, gpt2, monkeypatch):
    text = load_text("test")[:300_000] + f" literal {EOT} inside, \u00fcnicode \u2603 and  spaces \n\n"
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    fast = load_tokens(tmp_path / "doc.txt", gpt2, cache_dir=tmp_path / "fast")  # tiktoken path
    monkeypatch.setattr(sources, "gpt2_tiktoken", None)  # the fast path must not be taken now
    monkeypatch.setattr(sources, "_gpt2_definition", lambda: "not gpt2")
    slow = load_tokens(tmp_path / "doc.txt", gpt2, cache_dir=tmp_path / "slow")  # HF backend path
    assert fast.tolist() == slow.tolist() == [*gpt2(text).input_ids, 50256]


def test_embedded_corpus_source(tmp_path):
    tok = byte_tokenizer()
    tokens = load_tokens("prose:validation", tok, cache_dir=tmp_path)
    texts = [d.text for d in load_documents("validation")]
    assert len(tokens) == sum(len(t.encode()) + 1 for t in texts)
    assert tokens[: len(texts[0].encode()) + 1].tolist() == expected_stream(tok, texts[:1])


def test_saved_datasets_dataset(tmp_path, gpt2):
    datasets = pytest.importorskip("datasets")
    texts = ["Alpha beta.", "Gamma delta epsilon."]
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "ds"))
    tokens = load_tokens(tmp_path / "ds", gpt2, text_field="content", cache_dir=tmp_path / "cache")
    assert tokens.tolist() == expected_stream(gpt2, texts)
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": texts}),
            "validation": datasets.Dataset.from_dict({"text": ["x"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    val = load_tokens(tmp_path / "dd", gpt2, split="validation", cache_dir=tmp_path / "cache")
    assert val.tolist() == expected_stream(gpt2, ["x"])
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\], not 'test'"):
        load_tokens(tmp_path / "dd", gpt2, split="test", cache_dir=tmp_path / "cache")


def test_saved_dataset_without_datasets_package(tmp_path, gpt2, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install datasets"):
        load_tokens(tmp_path / "ds", gpt2, cache_dir=tmp_path / "cache")


def test_pretokenised_shards(tmp_path):
    a, b = np.arange(10, dtype=np.uint16), np.arange(100, 107, dtype=np.uint16)
    a.tofile(tmp_path / "00.bin")
    b.tofile(tmp_path / "01.bin")
    single = load_tokens(tmp_path / "00.bin")
    assert isinstance(single, np.memmap) and single.tolist() == a.tolist()
    shards = load_tokens(tmp_path)
    assert isinstance(shards, TokenShards) and len(shards) == 17
    whole = np.concatenate([a, b])
    for start, stop in [(0, 17), (3, 12), (10, 17), (9, 11), (12, 40), (5, 5)]:
        assert shards[start:stop].tolist() == whole[start:stop].tolist()
    big = np.array([70_000, 1, 2], dtype=np.uint32)
    big.tofile(tmp_path / "ids.uint32.bin")  # the name says the dtype
    assert load_tokens(tmp_path / "ids.uint32.bin").tolist() == big.tolist()
    big.tofile(tmp_path / "ids.bin")
    assert load_tokens(tmp_path / "ids.bin", dtype="uint32").tolist() == big.tolist()


def test_token_cache_is_reused_and_invalidated(tmp_path, gpt2, monkeypatch):
    path = tmp_path / "doc.txt"
    path.write_text("Some text to tokenise.")
    first = load_tokens(path, gpt2, cache_dir=tmp_path / "cache")
    calls = []
    real_write = sources._write_tokens
    monkeypatch.setattr(sources, "_write_tokens", lambda *a: (calls.append(a), real_write(*a)))
    again = load_tokens(path, gpt2, cache_dir=tmp_path / "cache")
    assert calls == [] and again.filename == first.filename and again.tolist() == first.tolist()

    path.write_text("Changed text.")  # new size and mtime -> new key
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = load_tokens(path, gpt2, cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and changed.tolist() == expected_stream(gpt2, ["Changed text."])
    load_tokens(path, byte_tokenizer(), cache_dir=tmp_path / "cache")  # another tokenizer -> another key
    assert len(calls) == 2
    leftovers = [p.name for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.endswith(".bin")]
    assert leftovers == [] and len(list((tmp_path / "cache" / "tokens").glob(".tmp-*"))) == 0


def test_bad_inputs_give_clear_errors(tmp_path, gpt2):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"'missing.txt' does not exist"):
        load_tokens("missing.txt", gpt2, cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no .txt, .jsonl or .bin files"):
        load_tokens(tmp_path / "empty", gpt2, cache_dir=cache)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=r"blank.txt contains no text"):
        load_tokens(tmp_path / "blank.txt", gpt2, cache_dir=cache)
    assert list((cache / "tokens").iterdir()) == []  # the failed run left no partial cache
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: no field 'text' \(found \['body'\]\).*--text-field"):
        load_tokens(tmp_path / "rows.jsonl", gpt2, cache_dir=cache)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_tokens(tmp_path / "broken.jsonl", gpt2, cache_dir=cache)
    (tmp_path / "notes.md").write_text("# markdown")
    with pytest.raises(ValueError, match=r"notes.md: unsupported file type; use .txt, .jsonl or .bin"):
        load_tokens(tmp_path / "notes.md", gpt2, cache_dir=cache)
    with pytest.raises(ValueError, match="pass a tokenizer"):
        load_tokens(tmp_path / "rows.jsonl")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a whole number of uint16 ids"):
        load_tokens(tmp_path / "odd.bin")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.bin").write_bytes(b"\x01\x00")
    (mixed / "b.txt").write_text("text")
    with pytest.raises(ValueError, match=r"mixes .bin token shards with text files"):
        load_tokens(mixed, gpt2, cache_dir=cache)


# ----------------------------------------------------------------------------------------------- packing


def test_windows_cover_the_stream_once_per_epoch():
    tokens = np.arange(1001, dtype=np.uint16)  # 1000 targets -> 100 windows of 11
    data = PackedDataset(tokens, seq_len=10, batch_size=8, seed=3)
    assert data.batches_per_epoch == 12  # 96 of 100 windows; the last partial batch is dropped
    starts = []
    for _ in range(data.batches_per_epoch):
        batch = next(data)
        assert batch.shape == (8, 11) and batch.dtype == torch.int64
        assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(8, 10, dtype=torch.int64))  # contiguous
        starts += (batch[:, 0] // 10).tolist()
    assert len(set(starts)) == 96 and starts != sorted(starts)
    next(data)
    assert data.epoch == 1 and data.step == 1  # rolled over into a new permutation
    ordered = PackedDataset(tokens, seq_len=10, batch_size=8, shuffle=False)
    assert next(ordered)[:, 0].tolist() == [0, 10, 20, 30, 40, 50, 60, 70]


def test_order_depends_only_on_the_seed():
    tokens = np.arange(5000, dtype=np.uint16)
    a, b, c = (PackedDataset(tokens, 16, 4, seed=s) for s in (1, 1, 2))
    first_a, first_b, first_c = next(a), next(b), next(c)
    assert torch.equal(first_a, first_b) and not torch.equal(first_a, first_c)


def test_resume_from_state_dict_gives_the_same_batches():
    tokens = np.random.default_rng(0).integers(0, 50000, 3000).astype(np.uint16)
    reference = PackedDataset(tokens, seq_len=32, batch_size=4, seed=7)
    expected = [next(reference) for _ in range(60)]  # 23 batches an epoch: crosses two epoch boundaries
    run = PackedDataset(tokens, seq_len=32, batch_size=4, seed=7)
    for _ in range(25):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON checkpoint
    resumed = PackedDataset(tokens, seq_len=32, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    for want in expected[25:]:
        assert torch.equal(next(resumed), want)
    with pytest.raises(ValueError, match="saved with seq_len=32, but this dataset has 64"):
        PackedDataset(tokens, seq_len=64, batch_size=4, seed=7).load_state_dict(state)


def test_ranks_split_each_global_batch():
    tokens = np.arange(4001, dtype=np.uint16)
    whole = PackedDataset(tokens, seq_len=20, batch_size=6, seed=5)
    ranks = [PackedDataset(tokens, seq_len=20, batch_size=3, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):  # across epoch boundaries
        assert torch.equal(next(whole), torch.cat([next(r) for r in ranks]))


def test_packing_bad_arguments():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedDataset(np.arange(50, dtype=np.uint16), seq_len=10, batch_size=8)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        PackedDataset(np.arange(500, dtype=np.uint16), seq_len=10, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="must be positive"):
        PackedDataset(np.arange(500, dtype=np.uint16), seq_len=0, batch_size=2)


def test_packing_reads_token_shards(tmp_path):
    np.arange(0, 300, dtype=np.uint16).tofile(tmp_path / "a.bin")
    np.arange(300, 601, dtype=np.uint16).tofile(tmp_path / "b.bin")
    data = PackedDataset(load_tokens(tmp_path), seq_len=50, batch_size=12, shuffle=False)
    expected = torch.stack([torch.arange(i * 50, i * 50 + 51) for i in range(12)])  # windows span the shard seam
    assert torch.equal(next(data), expected)
