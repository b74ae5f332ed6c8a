"""Model definitions: the Llama-family decoder and its small, named variations."""

from engine.models.gemma2 import Gemma2ForCausalLM
from engine.models.llama import LlamaForCausalLM
from engine.models.moe import MoeForCausalLM
from engine.models.phi3 import Phi3ForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,  # q/k norm: ModelConfig.qk_norm
    "phi3": Phi3ForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "mixtral": MoeForCausalLM,
    "qwen2_moe": MoeForCausalLM,
    "qwen3_moe": MoeForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM"]
