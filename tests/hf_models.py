"""Tiny random Hugging Face model folders for tests, made in a second, no network."""

from pathlib import Path

import torch
import transformers

# family → (config class, options beyond the shared tiny shape)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),  # as the small Qwen2.5 models
    "gemma2": (transformers.Gemma2Config, {}),  # tied, √d embedding scale, final-logit softcap 30
    "mistral": (transformers.MistralConfig, {}),
}


def tiny_config(family: str, vocab_size: int = 300, **overrides):
    cls, options = FAMILIES[family]
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return cls(**{**shape, **options, **overrides})


def save_tiny_model(folder: Path, family: str, weights: bool = True, seed: int = 0, max_shard_size: str = "5GB",
                    **overrides) -> Path:
    """A model folder: config.json, and safetensors weights (in shards of `max_shard_size`) unless
    `weights` is false."""
    transformers.utils.logging.disable_progress_bar()
    config = tiny_config(family, **overrides)
    if weights:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # an lm_head unlike a fresh init, so that taking it over is visible
            model.get_output_embeddings().weight.normal_(0, 0.5)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        config.save_pretrained(folder)
    return folder
