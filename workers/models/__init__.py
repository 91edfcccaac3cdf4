"""Model registry: HF architecture name → tensor-parallel model class."""

from __future__ import annotations

from workers.models.bert import BertModel, RobertaModel
from workers.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from workers.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from workers.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    # Encoders (embeddings only); task heads are skipped when their checkpoints load.
    "BertModel": BertModel,
    "BertForMaskedLM": BertModel,
    "BertForPreTraining": BertModel,
    "RobertaModel": RobertaModel,
    "RobertaForMaskedLM": RobertaModel,
    "XLMRobertaModel": RobertaModel,
    "XLMRobertaForMaskedLM": RobertaModel,
}

# GGUF-derived configs carry model_type but no architectures.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "mixtral": "MixtralForCausalLM",
                "bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}


def get_model_class(hf_config) -> type:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf_config.model_type]]
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    name = archs or [getattr(hf_config, "model_type", None)]
    raise ValueError(f"architecture {name} is not supported; supported: {sorted(MODEL_REGISTRY)}")
