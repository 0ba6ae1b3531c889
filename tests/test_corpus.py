"""The covariance corpus through ``datasets``: every local source reads the same texts, the stream is
cut as the earlier whole-file reader cut it, memory does not grow with it, counts are remembered,
and the default WikiText covariance keeps its cache key."""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import pipeline.corpus as corpus_mod
from conftest import CORPUS_TEXT, TRAIN_TEXT
from pipeline.config import ParamsError, load_params
from pipeline.corpus import Corpus, CorpusError, Cut, key_fields, summarise, text_blocks, windows

LINES = [ln.strip() for ln in (CORPUS_TEXT + TRAIN_TEXT).splitlines() if ln.strip()]
CUT = Cut(16)


def _flat(ws) -> list[int]:
    return [i for w in ws for i in w]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(LINES) + "\n", encoding="utf-8")  # blank lines between texts are skipped
    return p


def _sources(tmp, column: str = "body") -> dict[str, Corpus]:
    """The same texts as every other kind of local source."""
    import datasets

    rows = [{column: t, "id": i} for i, t in enumerate(LINES)]
    (tmp / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.table({column: LINES, "id": list(range(len(LINES)))}), tmp / "c.parquet")
    (tmp / "c.csv").write_text(f"id,{column}\n" + "\n".join(f'{i},"{t}"' for i, t in enumerate(LINES)))
    shards = tmp / "shards"
    shards.mkdir()
    for k in range(3):  # a directory of files, read in name order
        (shards / f"part-{k}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[k * 8 : (k + 1) * 8]))
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp / "dict"))
    return {"jsonl": Corpus.open(tmp / "c.jsonl", column), "parquet": Corpus.open(tmp / "c.parquet", column),
            "csv": Corpus.open(tmp / "c.csv", column), "dir": Corpus.open(shards, column),
            "saved": Corpus.open(tmp / "saved", column), "dict": Corpus.open(tmp / "dict", column, split="train")}


def test_every_local_source_gives_the_text_files_windows(tok, text_file, tmp_path):
    assert 24 >= len(LINES) > 16  # three shards of 8 rows hold them all
    want = list(windows(Corpus.from_file(text_file), tok, CUT))
    sources = _sources(tmp_path)
    for name, c in sources.items():
        assert list(windows(c, tok, CUT)) == want, name
    fps = {c.sha256 for c in sources.values()} | {Corpus.from_file(text_file).sha256}
    # content fingerprints: the saved dataset and the DatasetDict's train split are the same Arrow bytes
    assert sources["saved"].sha256 == sources["dict"].sha256 and len(fps) == len(sources)
    # a source's fingerprint is its content: the same file elsewhere has the same one
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes((tmp_path / "c.jsonl").read_bytes())
    assert Corpus.open(copy, "body").sha256 == sources["jsonl"].sha256


def test_cut_is_the_whole_text_tokenisation_and_limits_are_prefixes(tok_nobos, text_file):
    c = Corpus.from_file(text_file)
    stream = tok_nobos("\n".join(LINES), add_special_tokens=False)["input_ids"]
    full = list(windows(c, tok_nobos, CUT))
    assert _flat(full) == stream and all(len(w) == 16 for w in full[:-1])
    assert summarise(c, tok_nobos, CUT).joined_equal
    capped = list(windows(c, tok_nobos, Cut(16, max_tokens=37)))
    assert _flat(capped) == stream[:37] and [len(w) for w in capped] == [16, 16, 5]
    three = list(windows(c, tok_nobos, Cut(16, max_texts=3)))
    assert _flat(three) == tok_nobos("\n".join(LINES[:3]), add_special_tokens=False)["input_ids"]


def test_windows_stream_without_reading_the_whole_source(tok, text_file, monkeypatch):
    """An endless source still gives its first windows: nothing waits for the end of the corpus."""
    monkeypatch.setattr(Corpus, "texts", lambda self: (f"text number {i}" for i in itertools.count()))
    first = list(itertools.islice(windows(Corpus.from_file(text_file), tok, CUT), 50))
    assert len(first) == 50 and all(len(w) == 16 and w[0] == tok.bos_token_id for w in first)
    blocks = text_blocks(Corpus.from_file(text_file))
    assert [len(b) for b in itertools.islice(blocks, 3)] == [corpus_mod.BLOCK_TEXTS] * 3


def _prefix_space_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: a '▁' before the first word of each input, so a text tokenised on its own
    starts differently than inside the whole text."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(LINES * 2, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_key_names_what_differs_from_the_earlier_reader(tok, text_file, tmp_path):
    plain = Corpus.from_file(text_file)
    assert key_fields(plain, CUT, summarise(plain, tok, CUT)) == {}  # the earlier key, unchanged
    assert key_fields(plain, Cut(16, max_tokens=40), summarise(plain, tok, Cut(16, max_tokens=40))) == {"max_tokens": 40}
    sp = _prefix_space_tokenizer()
    s = summarise(plain, sp, CUT)
    assert not s.joined_equal and "tokenization" in key_fields(plain, CUT, s)
    pq_src = _sources(tmp_path)["parquet"]
    fields = key_fields(pq_src, CUT, summarise(pq_src, tok, CUT))
    assert fields["corpus_source"] == {"reader": "parquet", "text_column": "body", "split": None, "config": None}


def test_counting_pass_is_remembered_by_corpus_tokenizer_and_cut(tok, tok_nobos, text_file, tmp_path, monkeypatch):
    c, index = Corpus.from_file(text_file), tmp_path / "index"
    first = summarise(c, tok, CUT, index)
    assert first.n_windows == len(list(windows(c, tok, CUT))) and first.width == 16
    real = corpus_mod.count
    calls = []
    monkeypatch.setattr(corpus_mod, "count", lambda *a: calls.append(a[2]) or real(*a))
    assert summarise(c, tok, CUT, index) == first and calls == []
    summarise(c, tok_nobos, CUT, index)  # another tokenizer
    summarise(c, tok, Cut(32), index)  # another cut
    assert len(calls) == 2
    for f in index.glob("*.json"):
        f.write_text("{broken")
    assert summarise(c, tok, CUT, index) == first and len(calls) == 3  # unreadable: counted again


@pytest.mark.parametrize("make, message", [
    (lambda t: (t / "x.bin").write_text("a") and t / "x.bin", "unknown format"),
    (lambda t: t / "missing.jsonl", "does not exist"),
    (lambda t: (t / "d").mkdir() or t / "d", "no data files"),
    (lambda t: [(t / "m").mkdir(), (t / "m" / "a.jsonl").write_text("{}"), (t / "m" / "b.parquet").write_text("")]
     and t / "m", "mixes formats"),
])
def test_bad_sources_are_refused_before_reading(tmp_path, make, message):
    with pytest.raises((CorpusError, FileNotFoundError), match=message):
        Corpus.open(make(tmp_path))


def test_bad_columns_and_splits_say_what_there_is(tok, tmp_path):
    sources = _sources(tmp_path)
    for name in ("parquet", "saved"):
        with pytest.raises(CorpusError, match=r"no column 'text' \(columns: body, id\)"):
            list(windows(Corpus.open(tmp_path / ("c.parquet" if name == "parquet" else "saved")), tok, CUT))
    with pytest.raises(CorpusError, match="has no column 'text'|a row has no column 'text'"):
        list(windows(Corpus.open(tmp_path / "c.jsonl"), tok, CUT))
    with pytest.raises(CorpusError, match="splits train, test: set corpus.split"):
        Corpus.open(tmp_path / "dict")
    with pytest.raises(CorpusError, match="holds int values, not text"):
        list(windows(Corpus.open(tmp_path / "c.parquet", "id"), tok, CUT))
    assert sources["dict"].describe()["split"] == "train"


def test_corpus_and_process_parameters_are_validated(tmp_path):
    p = tmp_path / "params.yaml"
    for bad, message in [("corpus: {text_column: ''}", "corpus.text_column"), ("corpus: {split: 3}", "corpus.split"),
                         ("distributed: {processes: 0}", "distributed.processes"),
                         ("distributed: {processes: true}", "distributed.processes")]:
        p.write_text(bad)
        with pytest.raises(ParamsError, match=message):
            load_params(p)
    p.write_text("corpus: {path: /data/wiki, text_column: body, split: train}\ndistributed: {processes: 8}")
    cfg = load_params(p)
    assert cfg["corpus"]["text_column"] == "body" and cfg["distributed"]["processes"] == 8


def test_default_wikitext_corpus_keeps_its_cut_and_cache_key():
    """The bundled corpus with the bundled SmolLM2 setting: the tokens the earlier whole-file reader
    produced, and the cache key fields it wrote (so every existing covariance entry is still found)."""
    from transformers import AutoTokenizer

    from pipeline.editing.covariance import cache_key, cut_of
    from pipeline.editing.engine import default_corpus
    from pipeline.editing.hparams import load_hparams
    from pipeline.models.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    c = Corpus.open(default_corpus())
    hp = load_hparams("smollm2-135m-instruct", "pmet")
    lines = [ln.strip() for ln in c.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    stream = tok("\n".join(lines), add_special_tokens=False)["input_ids"]
    got = list(windows(c, tok, cut_of(hp)))
    assert got == [stream[i : i + 256] for i in range(0, len(stream), 256)]
    summary = summarise(c, tok, cut_of(hp))
    key = cache_key("fp", "mlp_out", 3, c, cut_of(hp), summary, "bfloat16")
    assert key == {"format": 1, "statistic": "uncentred second moment E[k k^T], float64 accumulation",
                   "model_fingerprint": "fp", "role": "mlp_out", "layer": 3,
                   "corpus_sha256": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
                   "n_tokens": 302244, "n_chunks": 1181, "max_length": 256, "dtype": "bfloat16"}


def test_ranks_share_the_batches_and_tokenise_only_their_blocks(tok, text_file, monkeypatch):
    """Three simulated ranks: their batches, in rank order, are the single process's; each tokenises
    only the blocks of texts its batches hold; a corpus changed since counting is refused."""
    from pipeline import distributed
    from pipeline.corpus import chunked, count, shard_batches

    monkeypatch.setattr(corpus_mod, "BLOCK_TEXTS", 3)
    c = Corpus.from_file(text_file)
    summary = count(c, tok, CUT)
    assert len(summary.block_tokens) == 8 and summary.text_tokens == sum(summary.block_tokens)
    want = list(chunked(windows(c, tok, CUT), 2))
    assert len(want) >= 6
    real, seen = corpus_mod.tokenise, []
    monkeypatch.setattr(corpus_mod, "tokenise", lambda t, block: seen[-1].append(block[0]) or real(t, block))
    got = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "size", lambda: 3)
        seen.append([])
        batches, n = shard_batches(c, tok, CUT, summary, 2)
        mine = list(batches)
        assert len(mine) == n
        got += mine
    assert got == want
    assert all(0 < len(s) < 8 for s in seen) and sum(map(len, seen)) <= 8 + 2  # at most the two boundary blocks twice
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "size", lambda: 1)
    text_file.write_text(text_file.read_text().replace("Paris", "Lyon"))
    with pytest.raises(CorpusError, match="changed since it was counted"):
        list(shard_batches(c, tok, CUT, summary, 2)[0])
