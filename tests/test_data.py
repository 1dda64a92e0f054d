import numpy as np

from chatforge.data.readers import iter_corpus
from chatforge.data.shards import WindowSampler, is_val_document, load_meta, open_tokens, prepare, unigram_entropy
from chatforge.tokenizer import EOT, decode, load_tokenizer


def test_prepare_writes_documents_separated_by_endoftext(data_dir, corpus):
    meta = load_meta(data_dir)
    tok = load_tokenizer(data_dir)
    train, val = open_tokens(data_dir, "train"), open_tokens(data_dir, "val")
    assert train.dtype == np.uint16 and len(train) == meta["train"]["tokens"]
    eot = tok.token_to_id(EOT)
    assert int((train == eot).sum()) == meta["train"]["documents"] and train[-1] == eot
    docs = list(iter_corpus([corpus]))
    val_docs = [d for d in docs if is_val_document(d, 0.05)]
    assert meta["val"]["documents"] == len(val_docs) > 0
    first_val = decode(tok, val[: list(val).index(eot)].tolist())
    assert first_val == val_docs[0]


def test_split_is_deterministic_and_by_document(corpus, tokenizer_dir, tmp_path):
    a = prepare([str(corpus)], tokenizer_dir, tmp_path / "a")
    b = prepare([str(corpus)], tokenizer_dir, tmp_path / "b")
    assert a["val"] == b["val"]
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert not (tmp_path / "a.tmp").exists()


def test_sampler_restores_its_exact_position():
    tokens = np.arange(10_000, dtype=np.uint16)
    s = WindowSampler(tokens, context=16, batch_size=4, seed=7)
    for _ in range(5):
        s.next_batch()
    state = s.state_dict()
    expected = [s.next_batch() for _ in range(3)]
    t = WindowSampler(tokens, context=16, batch_size=4, seed=7)
    t.load_state_dict(state)
    for x, y in expected:
        x2, y2 = t.next_batch()
        assert (x == x2).all() and (y == y2).all() and (x[:, 1:] == y[:, :-1]).all()


def test_unigram_entropy():
    assert abs(unigram_entropy(np.array([5, 5, 0, 5, 5])) - np.log(4)) < 1e-12


def test_reads_txt_gz_and_parquet_documents(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("First paragraph,\nstill first.\n\n\nSecond 第二段。\n")
    pq.write_table(pa.table({"text": ["床前明月光", "", "Let there be light"]}), tmp_path / "b.parquet")
    assert list(iter_corpus([tmp_path])) == ["First paragraph,\nstill first.", "Second 第二段。", "床前明月光",
                                             "Let there be light"]


def test_large_vocabularies_use_uint32_shards(tmp_path):
    from chatforge.tokenizer import save_tokenizer, train_tokenizer

    words = [f"w{i}x{i * 7}" for i in range(40_000)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(" ".join(words[i : i + 50]) for i in range(0, len(words), 50)))
    save_tokenizer(train_tokenizer(lambda: iter_corpus([corpus]), 70_000), tmp_path / "tok")
    meta = prepare([str(corpus)], tmp_path / "tok", tmp_path / "data", val_fraction=0.2)
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    train = open_tokens(tmp_path / "data", "train")
    assert train.dtype == np.uint32 and int(train.max()) >= 65_536  # ids above uint16 survive
