"""``bench.embed``: the random-BERT folder (loaded offline by sentence-transformers), the
sentences (seeded, each of its target token count), and the whole spmd-vs-st run on a
tiny random BERT in one call of ``main()``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as on the GPU image: no hub; before the HF imports

from bench import embed, random_bert  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return random_bert.build_random_bert("tiny", str(tmp_path_factory.mktemp("tiny-bert")))


def _printed_record(capsys) -> tuple[str, dict]:
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("vocab", ["real", "generated"])
def test_random_bert_is_a_sentence_transformers_folder(tmp_path, monkeypatch, vocab):
    from sentence_transformers import SentenceTransformer

    if vocab == "generated":  # the GPU image has no MiniLM package
        monkeypatch.setattr(random_bert, "_MINILM_PACKAGE", "no_such_package")
    path = random_bert.build_random_bert("tiny", str(tmp_path / "bert"), seed=3)
    info = json.loads((tmp_path / "bert" / "random_bert.json").read_text())
    assert (info["vocab"] == "generated") == (vocab == "generated")
    with open(os.path.join(path, "1_Pooling", "config.json")) as f:
        assert json.load(f)["pooling_mode_mean_tokens"] is True
    model = SentenceTransformer(path, device="cpu")
    assert model.max_seq_length == 512
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert len(model.tokenizer) == random_bert.VOCAB_SIZE
    assert model.tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == \
        [0, 100, 101, 102, 103]
    texts, counts = embed.make_sentences(model.tokenizer, 6, 5, 40, seed=1)
    emb = model.encode(texts, convert_to_numpy=True)
    assert emb.shape == (6, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # seeded weights: the same folder again encodes the same
    again = random_bert.build_random_bert("tiny", str(tmp_path / "again"), seed=3)
    np.testing.assert_allclose(SentenceTransformer(again, device="cpu").encode(texts), emb, atol=1e-6)


def test_sentences_have_their_target_lengths_and_are_seeded(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts, counts = embed.make_sentences(tokenizer, 50, 8, 64, seed=7)
    targets = np.random.default_rng(7).integers(8, 65, 50)
    assert counts == targets.tolist() == [len(i) for i in tokenizer(texts)["input_ids"]]
    assert embed.make_sentences(tokenizer, 50, 8, 64, seed=7) == (texts, counts)
    assert embed.make_sentences(tokenizer, 50, 8, 64, seed=8)[0] != texts
    assert len(set(texts)) == 50 and all(t.replace(" ", "").isalpha() for t in texts)


def test_st_only_run_reports_each_batch_size(tiny_bert, tmp_path, capsys):
    record = embed.main(["--model", tiny_bert, "--backends", "st", "--batch-sizes", "2,4",
                         "--num-sentences", "6", "--min-tokens", "4", "--max-tokens", "20"])
    out, printed = _printed_record(capsys)
    assert printed == record and "best st" in out
    assert [r["batch_size"] for r in record["results"]] == [2, 4]
    assert record["spmd_over_st"] is None and record["min_cosine"] is None
    assert all(r["min_cosine_vs_st"] > 0.9999 for r in record["results"])


def test_arguments_are_checked():
    for bad in (["--backends", "spmd,tei"], ["--batch-sizes", "0,4"], ["--batch-sizes", "a"],
                ["--min-tokens", "30", "--max-tokens", "20"], ["--save-dir", "/tmp/x"],
                ["--num-sentences", "0"]):
        with pytest.raises(SystemExit):
            embed.parse_args(bad)
    with pytest.raises(ValueError, match="max_seq_length 512"):
        embed.main(["--random-bert", "tiny", "--max-tokens", "600", "--backends", "st"])


@pytest.mark.slow
def test_spmd_and_st_side_by_side(tmp_path, ray_cluster, capsys):
    out_json, png = tmp_path / "embed.json", tmp_path / "embed.png"
    save_dir = tmp_path / "bert"
    record = embed.main(["--random-bert", "tiny", "--save-dir", str(save_dir), "--backends", "spmd,st",
                         "--batch-sizes", "2,8", "--num-sentences", "12", "--min-tokens", "4",
                         "--max-tokens", "40", "--device", "cpu", "--dtype", "float32",
                         "--json-out", str(out_json), "--plot", str(png)])
    out, printed = _printed_record(capsys)
    assert printed == record == json.loads(out_json.read_text())
    assert "spmd/st:" in out and "min cosine" in out
    assert (save_dir / "modules.json").exists() and record["model_path"] == str(save_dir)
    assert record["random_bert"] == "tiny" and record["num_sentences"] == 12
    assert 12 * 4 <= record["num_tokens"] <= 12 * 40
    rows = {(r["backend"], r["batch_size"]): r for r in record["results"]}
    assert set(rows) == {("st", 2), ("st", 8), ("spmd", 2), ("spmd", 8), ("spmd", None)}
    assert rows["spmd", 8]["max_num_seqs"] == 8
    assert rows["spmd", 8]["max_num_batched_tokens"] == embed.DEFAULT_BATCHED_TOKENS  # 8 * 40 is less
    assert rows["spmd", None]["max_num_batched_tokens"] == embed.DEFAULT_BATCHED_TOKENS
    for r in rows.values():
        assert r["elapsed_s"] > 0 and r["sentences_per_s"] > 0 and r["embedding_dim"] == 64
        assert r["tokens_per_s"] == pytest.approx(r["sentences_per_s"] * record["num_tokens"] / 12, rel=0.01)
        assert r["min_cosine_vs_st"] > 0.9999
    best = record["best"]
    assert best["spmd"]["sentences_per_s"] == max(r["sentences_per_s"] for (b, _), r in rows.items() if b == "spmd")
    assert record["spmd_over_st"] == pytest.approx(
        best["spmd"]["sentences_per_s"] / best["st"]["sentences_per_s"], rel=1e-3, abs=1e-4)
    assert record["min_cosine"] > 0.9999
    assert png.stat().st_size > 0


def test_profile_embed_times_each_phase_and_profiles(tiny_bert, tmp_path, capsys):
    from bench import profile_embed

    out_json = tmp_path / "profile.json"
    record = profile_embed.main(["--model", tiny_bert, "--device", "cpu", "--num-sentences", "40",
                                 "--max-tokens", "32", "--batch-size", "16", "--top", "5",
                                 "--json-out", str(out_json)])
    out = capsys.readouterr().out
    assert "cProfile of embed, by tottime" in out and "cProfile of embed, by cumulative" in out
    assert "llm.py" in out and "(embed)" in out  # LLM.embed heads the cumulative table
    assert record == json.loads(out_json.read_text())
    assert (record["num_sentences"], record["batch_size"], record["device"]) == (40, 16, "cpu")
    for key in ("tokenize_batched_s", "tokenize_one_by_one_s", "embed_s", "model_s",
                "embed_profiled_s"):
        assert record[key] > 0, key


def test_embed_serving_from_client_processes_matches_offline(tiny_bert, ray_cluster, capsys):
    # The real Serve app and openai clients in 2 processes; every sentence comes back, in
    # order, equal to offline LLM.embed.
    from bench import embed_serving

    record = embed_serving.main(["--model", tiny_bert, "--num-sentences", "24",
                                 "--concurrency", "4", "--inputs-per-request", "3",
                                 "--num-clients", "2", "--max-tokens", "40"])
    assert record["num_clients"] == 2
    assert record["http"]["tokens"] == record["offline"]["tokens"] > 24
    assert record["min_cosine"] > 0.99999
    assert record["http"]["client_cpu_util"] > 0


def test_collapsed_stacks_summary():
    from bench.embed_serving import summarize_collapsed

    text = "\n".join(["thread (1): loop;main (a.py:1);work (a.py:5) 30",
                      "thread (1): loop;main (a.py:1);other (a.py:9) 10",
                      "thread (2): tok;enc (b.py:2) 20", "not a stack line"])
    s = summarize_collapsed(text, ticks=100)
    assert s["samples"] == 60
    assert s["threads"] == {"thread (1): loop": 0.4, "thread (2): tok": 0.2}
    assert list(s["self"]) == ["work (a.py:5)", "enc (b.py:2)", "other (a.py:9)"]
    assert s["self"]["work (a.py:5)"] == 0.5 and s["inclusive"]["main (a.py:1)"] == round(40 / 60, 3)
