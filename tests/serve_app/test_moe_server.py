"""A mixture of experts through the real Serve app at tp=2: a tiny Qwen3-MoE with SmolLM2's
tokenizer, served by ``serve_app:deploy`` and queried with the real ``openai`` client,
writes transformers' greedy text, streamed or not."""

import pytest

from conftest import free_port, hf_greedy
from serve_app import deploy
from tiny_models import VARIANTS, build_tiny

pytestmark = pytest.mark.slow

API_KEY = "moe-key"
MODEL = "tiny-qwen3-moe"
PROMPT = "The experts of a mixture"
MAX_TOKENS = 12
GREEDY = dict(temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory, smollm2_tokenizer):
    _, overrides = VARIANTS["qwen3_moe"]
    path = build_tiny(tmp_path_factory.mktemp("moe"), "qwen3_moe", **{
        **overrides, "vocab_size": len(smollm2_tokenizer), "tie_word_embeddings": True,
        "max_position_embeddings": 512, "eos_token_id": smollm2_tokenizer.eos_token_id})
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_url(ray_cluster, moe_model):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deploy({"model": moe_model, "max_model_len": "512", "api_key": API_KEY,
                      "served_model_name": MODEL, "tensor_parallel_size": "2"}),
              name="spmd-moe", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_completions_and_chat_equal_transformers(client, moe_model, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(PROMPT)
    want = smollm2_tokenizer.decode(hf_greedy(moe_model, [ids], MAX_TOKENS)[0],
                                    skip_special_tokens=True)
    out = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert out.choices[0].text == want
    assert out.usage.completion_tokens == MAX_TOKENS
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want

    messages = [{"role": "user", "content": "Route me"}]
    chat_ids = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
    chat_ids = list(getattr(chat_ids, "input_ids", chat_ids))
    chat_want = smollm2_tokenizer.decode(hf_greedy(moe_model, [chat_ids], MAX_TOKENS)[0],
                                         skip_special_tokens=True)
    chat = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert chat.choices[0].message.content == chat_want
    assert chat.usage.prompt_tokens == len(chat_ids)
