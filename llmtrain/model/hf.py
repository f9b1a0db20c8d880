"""Hugging Face causal LMs as bodies: `model.hf: FOLDER` (config.json, optionally *.safetensors and
tokenizer.json) gives the transformers base model of that architecture as the body, and its
lm_head as the head's weight. Local files only: nothing is ever downloaded.

The split is the one DESIGN.md describes for every model: the base model returns hidden states,
the head owns the output layer. What a causal-LM wrapper adds after its base model moves into the
head: `lm_head` (weight and bias) for heads that are a linear lm_head, Gemma's final-logit softcap
as the head's `softcap`. Embedding scaling and tying stay where transformers keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.errors import UserError

# ModelConfig field ← config.json attribute: the resolved recipe shows the real architecture.
ARCHITECTURE_FIELDS = {
    "layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "ffn_hidden": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
}


@dataclasses.dataclass(frozen=True)
class HFFolder:
    path: Path
    config: Any  # transformers.PretrainedConfig
    weights: tuple[Path, ...]  # *.safetensors, sorted; empty: random init from the config
    tokenizer: Path | None  # tokenizer.json, when the folder has one

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def softcap(self) -> float | None:
        """The final-logit softcap a causal-LM wrapper applies after lm_head (Gemma 2/3)."""
        return getattr(self.config, "final_logit_softcapping", None)

    def architecture(self) -> dict[str, Any]:
        """The recipe's model fields as this config sets them."""
        c = self.config
        fields = {key: getattr(c, attr) for key, attr in ARCHITECTURE_FIELDS.items() if getattr(c, attr, None) is not None}
        fields["tie_embeddings"] = bool(getattr(c, "tie_word_embeddings", False))  # absent means untied
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
        if rope is not None:
            fields["rope_theta"] = float(rope)
        return fields


def _quiet_transformers():
    if not torch.cuda.is_available():  # transformers imports DeepSpeed, which then announces its CPU pick
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.utils.logging.set_verbosity_error()  # weight-init notices are for interactive use
    transformers.utils.logging.disable_progress_bar()  # one bar per load would fill the run's log
    return transformers


def read_hf_folder(path: str | Path, key: str = "model.hf") -> HFFolder:
    """Check a local model folder and read its config; UserError naming the path otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key}: {path} is not a folder; point it at a local Hugging Face model folder "
                        "(config.json, optionally *.safetensors and tokenizer.json); nothing is downloaded")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{key}: {folder} has no config.json; a Hugging Face model folder needs one")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{key}: {config_file} is not a JSON object: {e}") from None
    transformers = _quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise UserError(f"{key}: {config_file}: transformers {transformers.__version__} does not know the "
                        f"architecture {model_type!r} ({str(e).splitlines()[0]})") from None
    name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{key}: {name} is an encoder-decoder model; llmtrain trains decoder-only language models")
    if getattr(config, "is_decoder", True) is False:  # only encoder-capable configs carry the flag
        raise UserError(f"{key}: {name} ({model_type}) is an encoder (is_decoder is false: its attention sees the "
                        "whole sequence); llmtrain trains decoder-only language models")
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{key}: {name} ({model_type}) has no causal-LM model in transformers; llmtrain needs a "
                        "decoder-only model whose base model returns hidden states")
    if any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
        raise UserError(f"{key}: {folder} holds *.bin (pickle) weights only; llmtrain reads safetensors "
                        "(convert them with transformers' save_pretrained(..., safe_serialization=True))")
    tokenizer = folder / "tokenizer.json"
    return HFFolder(folder, config, tuple(sorted(folder.glob("*.safetensors"))),
                    tokenizer if tokenizer.is_file() else None)


def empty_causal_lm(config) -> nn.Module:
    """The causal-LM model of `config` on the meta device: names and shapes, no memory."""
    transformers = _quiet_transformers()
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def check_weights(hf: HFFolder, key: str = "model.hf") -> None:
    """Every safetensors file readable, every weight the config needs present with its shape.
    Reads the files' headers only."""
    from safetensors import safe_open

    if not hf.weights:
        return
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in hf.weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    found[name] = (tuple(f.get_slice(name).get_shape()), path)
        except Exception as e:  # safetensors raises its own error types for torn or foreign files
            raise UserError(f"{key}: {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                            "download it again") from None
    expected = empty_causal_lm(hf.config)
    tied = {n for n, p in expected.named_parameters(remove_duplicate=False)} - {n for n, _ in expected.named_parameters()}
    problems = []
    for name, tensor in expected.state_dict().items():
        if name not in found:
            if name not in tied:
                problems.append(f"{name} is missing")
        elif found[name][0] != tuple(tensor.shape):
            problems.append(f"{name} is {list(found[name][0])} in {found[name][1].name}, the config needs {list(tensor.shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"{key}: the weights in {hf.path} do not match its config.json: {shown}")


def resolve_recipe_fields(raw: dict[str, Any]) -> list[str]:
    """Fill a raw recipe's model, tokenizer and head fields from its `model.hf` folder, in place.
    A field the recipe sets to another value than the config's is an error (the config decides the
    architecture); returns the problems found."""
    model = raw.get("model")
    try:
        hf = read_hf_folder(model["hf"])
    except UserError as e:
        return [str(e)]
    problems = []
    for field, value in hf.architecture().items():
        if field in model and model[field] != value:
            problems.append(f"model.{field}: {model[field]!r}, but {hf.path / 'config.json'} has {value!r}; "
                            f"remove model.{field} (the config decides the architecture)")
        model[field] = value
    tokenizer = raw.setdefault("tokenizer", {})
    if isinstance(tokenizer, dict):
        if hf.tokenizer is not None:
            tokenizer.setdefault("path", str(hf.tokenizer))
        size = tokenizer.setdefault("vocab_size", hf.vocab_size)
        if isinstance(size, int) and size > hf.vocab_size:
            problems.append(f"tokenizer.vocab_size: {size} exceeds the model's vocabulary ({hf.vocab_size} in "
                            f"{hf.path / 'config.json'}); a token id past it has no embedding")
    head = raw.setdefault("head", {})
    if isinstance(head, dict) and hf.softcap:
        from llmtrain.heads import HEADS, head_class

        name = head.get("type", "softmax")
        if name in HEADS and head_class(name).linear_lm_head:
            head.setdefault("softcap", float(hf.softcap))
    return problems


def check_before_launch(hf_path: str, tokenizer_size: int, weights: bool) -> None:
    """What the ranks would otherwise fail on: unreadable or mismatched weights (when they will be
    read), and a tokenizer with ids past the model's vocabulary."""
    hf = read_hf_folder(hf_path)
    if weights:
        check_weights(hf)
    if tokenizer_size > hf.vocab_size:
        raise UserError(f"tokenizer.path: the tokenizer has {tokenizer_size:,} tokens, more than the model's "
                        f"vocabulary ({hf.vocab_size:,} in {hf.path / 'config.json'}); use the model's own tokenizer")


class HFBody(nn.Module):
    """A transformers base model as a body: token ids [B, T] → hidden states [B, T, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).last_hidden_state


def build_causal_lm(hf: HFFolder, load_weights: bool) -> nn.Module:
    """The causal-LM model in fp32: the folder's weights when it has them and `load_weights`, else
    a random init from the config (seeded by the caller). Under ZeRO-3 the caller keeps a
    transformers HfDeepSpeedConfig alive, and transformers builds it partitioned
    (deepspeed.zero.Init) and loads the weights shard by shard."""
    transformers = _quiet_transformers()
    auto = transformers.AutoModelForCausalLM
    if load_weights and hf.weights:
        return auto.from_pretrained(hf.path, local_files_only=True, dtype=torch.float32)
    return auto.from_config(hf.config, dtype=torch.float32)
