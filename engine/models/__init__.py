"""Model definitions. Every supported architecture is a Llama-family decoder."""

from engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM"]
