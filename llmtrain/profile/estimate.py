"""The analytic memory model behind `llmtrain profile`: bytes per rank, by component, for any
shape, allocating nothing (nothing here builds a tensor of the modelled size).

Components, per rank, for a recipe's ZeRO stage and world size:
  parameters, gradients, optimizer_states  the model states (DeepSpeed's partitioning rules;
                    gradients: every copy at the optimizer step, fp32 ones included)
  zero_buffers      DeepSpeed's gradient-reduction bucket (allocated whole, whatever the model size;
                    total_on_cpu counts only the part a CPU rank writes, see _zero_buffers)
  zero3_gathered    ZeRO-3: weights gathered in full beside the rank's partition and kept from
                    forward to backward (see _zero3_gathered)
  activations       what the body keeps from its forward for backward over one micro-batch (with
                    activation checkpointing: each layer's input)
  recomputed        activation checkpointing: one layer's saved tensors, recomputed in its backward
  layer_backward    what one layer's backward allocates beyond the tensors it saved
  head_transient    the head's own memory model (`Head.transient_bytes`)
head_total is the head's forward + backward peak over its inputs and weights: head_transient plus
its weight gradients (as the CCE paper's Table 1 counts it). total is the per-rank peak:
  parameters + optimizer_states + zero_buffers + max(working, gradients)
  working = activations + zero3_gathered + max(head_total, head weight gradients + recomputed + layer_backward)
because the head runs its backward first and frees its transient memory before the body's
backward, and the body's activations are freed during backward as its gradients appear.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from llmtrain.heads import HEADS, build_head, head_class, parse_head_options
from llmtrain.heads.base import dtype_bytes
from llmtrain.heads.temperature import attach_temperature
from llmtrain.model.decoder import ffn_size
from llmtrain.recipe import ModelConfig, Recipe, TemperatureConfig

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Published architectures without a recipe file or weights: their config.json as shipped (under
# llmtrain/profile/presets/), profiled as a Hugging Face body at the CCE paper's 8,192 tokens per
# micro-batch, bf16, ZeRO-3 on 8 ranks (each is overridable from the command line).
PRESET_DIR = Path(__file__).parent / "presets"
PRESET_NAMES = {"gemma2-2b": "Gemma-2-2B", "llama3-8b": "Llama-3-8B", "qwen2.5-7b": "Qwen2.5-7B"}  # published names


def hf_recipe(path: str | Path, name: str, seq_len: int = 8192) -> dict[str, Any]:
    """The raw recipe `profile --hf PATH` and the presets start from: the folder decides the
    architecture (validate_recipe reads it), the rest is a training shape worth asking about."""
    return {"name": name, "model": {"hf": str(path), "seq_len": seq_len},
            "train": {"micro_batch": 1, "precision": "bf16"}, "deepspeed": {"zero_stage": 3},
            "launch": {"ranks_per_node": 8}}


PRESETS: dict[str, dict[str, Any]] = {name: hf_recipe(PRESET_DIR / name, name) for name in PRESET_NAMES}

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_budget(text: str) -> int:
    """'80GB' (10⁹), '80 GiB' (2³⁰), '512MiB', '80e9B' → bytes. The unit is required: a bare 80
    would be 80 bytes, which nobody means."""
    match = _BUDGET.match(str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"--budget {text!r}: write a size with its unit, such as 80GB, 80GiB or 512MiB")
    value = float(match.group(1)) * _UNITS[unit]
    if not 1 <= value < 2**63:
        raise ValueError(f"--budget {text!r}: must be between 1 byte and 8 EiB")
    return int(value)


# ----------------------------------------------------------------------------- parameters


class ParamCount(NamedTuple):
    body: int  # embedding (when not tied), blocks, final norm
    head: int  # the temperature network included
    total: int  # unique parameters
    largest_module: int  # the most parameters one module owns: what ZeRO-3 gathers at once
    trainable: int  # those with gradients and optimizer states (TempNet's frozen_body: the network only)


def body_param_count(cfg: ModelConfig, vocab_size: int) -> tuple[int, int, int]:
    """(parameters of the body including its embedding, the most one module owns, the embedding's).
    A Hugging Face body is counted on its meta-device model, at its config's vocabulary."""
    if cfg.hf:
        from llmtrain.profile.hf_memory import hf_body_shape

        s = hf_body_shape(cfg.hf)
        return s.params, s.largest_module, s.embedding
    d, f = cfg.d_model, ffn_size(cfg)
    per_block = 2 * d + 3 * d * d + d * d + 2 * f * d + f * d  # 2 norms, qkv, out, gate_up, down
    return vocab_size * d + cfg.layers * per_block + d, max(vocab_size * d, 3 * d * d, 2 * f * d), vocab_size * d


class _SkipNormalFill(TorchFunctionMode):
    """Skips normal fills: on the meta device they fill nothing, but run a Python reference whose
    first call imports torch._dynamo, 2 s of every `llmtrain run`'s memory check."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.init.normal_, torch.Tensor.normal_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def head_param_count(head_spec: Mapping[str, Any], hidden_size: int, vocab_size: int,
                     temperature: TemperatureConfig | None = None) -> tuple[int, int]:
    """(the head's parameters, those of its temperature network when `temperature` is enabled).
    The constructors say how many weights there are; the head is built on the meta device, so no
    weight is ever allocated (a [2²¹, 4096] fp32 weight is 32 GiB, more than a laptop can even
    reserve). Heads keep their small data tables (hsm's clusters) on the CPU themselves."""
    with torch.device("meta"), _SkipNormalFill():
        head = build_head(head_spec, hidden_size=hidden_size, vocab_size=vocab_size)
        if temperature is not None and temperature.enabled:
            attach_temperature(head, **temperature.network_options())
    network = sum(p.numel() for p in head.temperature.parameters()) if head.temperature is not None else 0
    return sum({id(p): p.numel() for p in head.parameters()}.values()), network


def param_count(cfg: ModelConfig, vocab_size: int, head_spec: Mapping[str, Any],
                temperature: TemperatureConfig | None = None) -> ParamCount:
    body, largest, embedding = body_param_count(cfg, vocab_size)
    head, network = head_param_count(head_spec, cfg.d_model, vocab_size, temperature)
    tied = cfg.tie_embeddings and head_class(dict(head_spec).get("type", "softmax")).supports_tying
    total = body + head - (embedding if tied else 0)
    frozen_body = bool(network) and temperature.mode == "frozen_body"
    # the network runs inside the head's forward: ZeRO-3 holds both gathered at once
    return ParamCount(body, head, total, max(largest, head), network if frozen_body else total)


# ----------------------------------------------------------------------------- activations


class BodyActivations(NamedTuple):
    """The body's memory for backward over one micro-batch, in bytes."""

    saved: int  # kept from the forward to the backward: every layer's saved tensors (with
    # activation checkpointing: each layer's input), the final norm's, the token ids
    recomputed: int  # activation checkpointing: one layer's saved tensors, recomputed in its backward
    backward: int  # what one layer's backward allocates beyond the tensors it saved, at its peak


def activation_bytes(cfg: ModelConfig, micro_batch: int, precision: str) -> BodyActivations:
    """The body's memory for backward over `micro_batch` × seq_len tokens: a Hugging Face body's
    by profile/hf_memory.py, ours (llmtrain/model/decoder.py) as follows.

    Saved per block, in units of tokens × d_model (a = bytes of the working dtype):
      each RMSNorm: its fp32 input copy (4), the normalized output (a), the scaled output (a)
      attention: qkv (3a), the rotated q and k (2a), the SDPA output and its reshaped copy (2a)
    and in units of tokens × ffn: gate_up (2a), silu(gate) (a), the product (a).
    Plus per-token fp32 scalars (two rsqrt, per-head log-sum-exp of SDPA), the final norm and the
    int64 token ids. With activation checkpointing each block keeps only its input (a × d_model
    per token), and one block's saved tensors are recomputed and live during its backward.
    A block's backward allocates, beyond what it saved, the gradients of silu(gate) and of up
    (2a × ffn) beside the incoming one (a × d_model); the final norm's saved tensors are freed by
    then. Measured within a few percent on tiny models (tests/test_profile_hf.py).
    """
    a = dtype_bytes(PRECISION_DTYPES[precision])
    if cfg.hf:
        from llmtrain.profile.hf_memory import hf_activation_bytes, hf_body_shape

        return BodyActivations(*hf_activation_bytes(hf_body_shape(cfg.hf), micro_batch, cfg.seq_len, a,
                                                    cfg.activation_checkpointing))
    d, f = cfg.d_model, ffn_size(cfg)
    norm = (4 + 2 * a) * d + 4
    block = 2 * norm + 7 * a * d + 4 * a * f + 4 * cfg.n_heads
    ckpt = cfg.activation_checkpointing
    tokens = micro_batch * cfg.seq_len
    return BodyActivations(saved=tokens * ((cfg.layers * a * d if ckpt else cfg.layers * block) + norm + 8),
                           recomputed=tokens * block if ckpt else 0, backward=tokens * max(0, 2 * a * f + a * d - norm))


# ----------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Bytes per rank by component (see the module docstring for how `total` combines them)."""

    head: str
    components: dict[str, int]
    head_total: int
    total: int
    notes: list[str] = field(default_factory=list)
    params: ParamCount | None = None  # with a model around the head
    total_on_cpu: int | None = None  # a CPU rank's resident bytes: untouched pages of the ZeRO buffers left out

    def to_json(self) -> dict[str, Any]:
        on_cpu = {} if self.total_on_cpu is None else {"total_on_cpu": self.total_on_cpu}
        return {**self.components, "head_total": self.head_total, "total": self.total, **on_cpu}


def head_memory(head_spec: Mapping[str, Any], tokens: int, hidden: int, vocab: int, precision: str) -> tuple[int, int]:
    """(transient bytes from the head's own model, bytes of its weight gradients)."""
    _check_shape(tokens=tokens, hidden=hidden, vocab=vocab)
    cls, options = parse_head_options(head_spec)
    dtype = PRECISION_DTYPES[precision]
    transient = int(cls.transient_bytes(options, tokens, hidden, vocab, dtype))
    return transient, head_param_count(head_spec, hidden, vocab)[0] * dtype_bytes(dtype)


def estimate_head(head_spec: Mapping[str, Any], tokens: int, hidden: int, vocab: int, precision: str) -> Estimate:
    """A bare shape (no model around the head): the head's forward + backward only."""
    transient, grads = head_memory(head_spec, tokens, hidden, vocab, precision)
    params = grads  # the weights are held in the same dtype as their gradients
    comps = {"parameters": params, "gradients": grads, "head_transient": transient}
    return Estimate(_name(head_spec), comps, transient + grads, params + transient + grads)


def estimate_recipe(recipe: Recipe, vocab: int, world_size: int | None = None) -> Estimate:
    """One rank of `recipe` (its head, ZeRO stage, offload, precision, micro-batch) on `world_size`
    ranks (default: the recipe's)."""
    from llmtrain.train.engine_config import deepspeed_config

    world = world_size or recipe.world_size
    _check_shape(world_size=world, vocab=vocab)
    cfg, t = recipe.model, recipe.train
    spec = recipe.head_spec()
    ds = deepspeed_config(recipe, world)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    precision = "bf16" if bf16 else "fp32"
    w = dtype_bytes(PRECISION_DTYPES[precision])

    pc = param_count(cfg, vocab, spec, recipe.temperature)
    reserved, written = _zero_buffers(zero, stage, w, pc.trainable)
    shard = lambda n, from_stage: n / world if stage >= from_stage else n  # noqa: E731
    # Beside the working-dtype model, DeepSpeed keeps fp32 master weights (Adam's two moments with
    # them) and gives them fp32 gradients at the optimizer step, except for an fp32 model at
    # stage 0, which is its own master. Gradients count every copy that exists at the step.
    master = bf16 or stage >= 1
    grad_bytes = shard(pc.trainable * w, 2) + (shard(pc.trainable * 4, 1) if master else 0)
    opt_bytes = shard(pc.trainable * (12 if master else 8), 1)
    comps = {
        "parameters": 0 if offload_param else int(shard(pc.total * w, 3)),
        "gradients": int(shard(pc.trainable * w, 2)) if offload_opt else int(grad_bytes),
        "optimizer_states": 0 if offload_opt else int(opt_bytes),
        "zero_buffers": reserved,
        "zero3_gathered": _zero3_gathered(zero, pc.total, pc.largest_module) * w if stage == 3 else 0,
    }
    body = activation_bytes(cfg, t.micro_batch, precision)
    comps.update(activations=body.saved, recomputed=body.recomputed, layer_backward=body.backward)
    transient, head_grads = head_memory(spec, t.micro_batch * cfg.seq_len, cfg.d_model, vocab, precision)
    comps["head_transient"] = transient
    head_total = transient + head_grads
    # The head's forward and backward run first; its transient memory is freed before the body's
    # backward (and a checkpointed layer's recomputation) begins, its weight gradients are not.
    working = (comps["activations"] + comps["zero3_gathered"]
               + max(head_total, head_grads + body.recomputed + body.backward))
    total = comps["parameters"] + comps["optimizer_states"] + comps["zero_buffers"] + max(working, comps["gradients"])
    on_cpu = total - reserved + written
    notes = [f"ZeRO-{stage}, {world} rank{'s' if world > 1 else ''}, {precision}, "
             f"micro-batch {t.micro_batch} × {cfg.seq_len} tokens"
             + (", activation checkpointing" if cfg.activation_checkpointing else "")]
    if cfg.hf:
        notes += _hf_notes(cfg, t.micro_batch, precision)
    if offload_opt or offload_param:
        notes.append("offloaded states are held in CPU memory and not counted per rank")
    if recipe.temperature.enabled:
        notes.append("the temperature network's weights and optimizer states are counted, not its per-step "
                     "transient memory (with softmax: a tempered copy of the scores)")
    if written < reserved:
        from llmtrain.train.memory import format_bytes

        notes.append(f"ZeRO buffers: DeepSpeed allocates {format_bytes(reserved)}, a GPU holds all of it; a CPU rank "
                     f"holds only the {format_bytes(written)} its gradients are written into")
    return Estimate(_name(spec), comps, head_total, int(total), notes, pc, int(on_cpu))


def _hf_notes(cfg: ModelConfig, micro_batch: int, precision: str) -> list[str]:
    from llmtrain.profile.hf_memory import FUSED_ATTENTION, hf_body_shape

    s = hf_body_shape(cfg.hf)
    notes = [f"Hugging Face body: {s.model_type}, {_count(s.params)} parameters (counted on its meta-device model), "
             f"{s.attention} attention"]
    if not s.calibrated:
        notes.append(f"activations of a {s.model_type} body are modelled as a Llama decoder's, "
                     "not calibrated for this family: measure a tiny one (`llmtrain profile` without --no-measure)")
    if s.attention not in FUSED_ATTENTION:
        # the [T, T] scores of every layer: usually the largest part of such a body's activations
        a = dtype_bytes(PRECISION_DTYPES[precision])
        per_key = (a if s.attn_softcap else 0) + 4 + (a if a != 4 else 0)
        scores = micro_batch * cfg.seq_len ** 2 * s.heads * per_key * (1 if cfg.activation_checkpointing else s.layers)
        from llmtrain.train.memory import format_bytes

        notes.append(f"{s.attention} attention keeps each layer's [T, T] scores for backward: {format_bytes(scores)} of "
                     "the activations")
    return notes


def deepspeed_model_states(recipe: Recipe, vocab: int, world_size: int) -> int | None:
    """DeepSpeed's own estimator (model states only, per rank) where its assumptions hold: bf16
    mixed precision at ZeRO-2 or ZeRO-3. None elsewhere."""
    d = recipe.deepspeed
    if recipe.train.precision != "bf16" or d.zero_stage not in (2, 3):
        return None
    pc = param_count(recipe.model, vocab, recipe.head_spec(), recipe.temperature)
    with _quiet_deepspeed_import():
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    offload = d.offload_optimizer != "none"
    if d.zero_stage == 2:
        return estimate_zero2_model_states_mem_needs(pc.total, world_size, 1, offload)[1]
    return estimate_zero3_model_states_mem_needs(pc.total, pc.largest_module, world_size, 1, offload,
                                                 d.offload_param != "none")[1]


@contextlib.contextmanager
def _quiet_deepspeed_import():
    """DeepSpeed's first import prints which accelerator it picked to stdout; keep the table clean,
    then point its log handlers back at the real streams."""
    import logging

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield
    for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler.stream is buffer:
                handler.setStream(sys.stdout)


# ----------------------------------------------------------------------------- the verdict


class Fix(NamedTuple):
    change: str
    total: int


def fixes_for_recipe(recipe: Recipe, vocab: int, world_size: int, budget: int) -> list[Fix]:
    """Changes that bring the recipe under `budget` per rank, least disruptive first: a higher ZeRO
    stage (only communication changes), activation checkpointing (each layer's forward runs a second
    time), a smaller micro-batch with more accumulation (the same global batch, lower
    throughput), another head (a different output layer)."""
    fixes = []
    for stage in range(recipe.deepspeed.zero_stage + 1, 4):
        total = estimate_recipe(recipe_with(recipe, deepspeed={"zero_stage": stage}), vocab, world_size).total
        if total <= budget:
            fixes.append(Fix(f"ZeRO-{stage}", total))
            break
    if not recipe.model.activation_checkpointing:
        total = estimate_recipe(recipe_with(recipe, model={"activation_checkpointing": True}), vocab, world_size).total
        if total <= budget:
            fixes.append(Fix("model.activation_checkpointing", total))
    mb, accum = recipe.train.micro_batch, recipe.train.grad_accum
    for smaller in (m for m in range(mb - 1, 0, -1) if mb % m == 0):
        variant = recipe_with(recipe, train={"micro_batch": smaller, "grad_accum": accum * mb // smaller})
        total = estimate_recipe(variant, vocab, world_size).total
        if total <= budget:
            fixes.append(Fix(f"micro_batch {smaller} × grad_accum {accum * mb // smaller}", total))
            break
    for name in HEADS:
        if name != recipe.head.type:
            total = estimate_recipe(recipe_with(recipe, head={"type": name}), vocab, world_size).total
            if total <= budget:
                fixes.append(Fix(f"head {name}", total))
    return fixes


def fixes_for_shape(head_spec: Mapping[str, Any], tokens: int, hidden: int, vocab: int, precision: str,
                    budget: int) -> list[Fix]:
    """For a bare shape: the most tokens per step (halving) that fit, then other heads."""
    fixes = []
    fewer = tokens // 2
    while fewer >= 1:
        total = estimate_head(head_spec, fewer, hidden, vocab, precision).total
        if total <= budget:
            fixes.append(Fix(f"tokens {fewer}", total))
            break
        fewer //= 2
    for name in HEADS:
        if name != _name(head_spec):
            total = estimate_head({"type": name}, tokens, hidden, vocab, precision).total
            if total <= budget:
                fixes.append(Fix(f"head {name}", total))
    return fixes


def _tying_ok(recipe: Recipe, head: str) -> bool:
    return not recipe.model.tie_embeddings or head_class(head).supports_tying


def recipe_with(recipe: Recipe, **sections: Mapping[str, Any]) -> Recipe:
    """The recipe with sections updated (`head` replaced whole); a tied embedding is untied for a
    head that cannot share it."""
    data = recipe.model_dump()
    for key, values in sections.items():
        data[key] = dict(values) if key == "head" else {**data[key], **values}
    if "head" in sections and not _tying_ok(recipe, _name(data["head"])):
        data["model"]["tie_embeddings"] = False
    if "head" in sections and recipe.model.hf:
        # A Hugging Face model's final-logit softcap (Gemma 2) belongs to every head that stands in
        # for its lm_head, as validate_recipe gives it to the recipe's own head.
        from llmtrain.profile.hf_memory import hf_final_softcap

        cap = hf_final_softcap(recipe.model.hf)
        if cap and head_class(_name(data["head"])).linear_lm_head:
            data["head"].setdefault("softcap", cap)
    return Recipe.model_validate(data)


def _zero_buffers(zero: Mapping[str, Any], stage: int, w: int, gradient_elements: int) -> tuple[int, int]:
    """(bytes DeepSpeed allocates for its gradient-reduction bucket, bytes of it that gradients are
    written into). The bucket is allocated whole (reduce_bucket_size elements, two of them when
    overlap_comm double-buffers at stages 1-2), however small the model: a CUDA allocator counts all
    of it. On CPU an untouched page of a large allocation is never resident, and each backward
    copies the gradients into the bucket from its start, so a CPU rank holds only the part written:
    the model's gradients up to one bucket, spilling into the second buffer only past that."""
    if stage == 0 or not zero.get("contiguous_gradients", True):
        return 0, 0
    bucket = int(float(zero.get("reduce_bucket_size", 5e8)))
    buffers = 2 if zero.get("overlap_comm", stage == 3) and stage < 3 else 1
    written = min(gradient_elements, bucket * buffers)
    return bucket * buffers * w, written * w


def _zero3_gathered(zero: Mapping[str, Any], total: int, largest_module: int) -> int:
    """Parameters a ZeRO-3 rank holds gathered at the head's backward. DeepSpeed all-gathers a
    module's weights into a new full-size buffer beside the rank's own partition and, once its
    first step has recorded the module order, releases a gathered weight only if it is not used
    again within stage3_max_reuse_distance parameters (default 1e9). A module whose forward ends `a`
    parameters before the forward's end is used again about 2a parameters later, in its backward:
    so the forward's last reuse_distance / 2 parameters stay gathered — the whole model when it is
    smaller (measured on CPU: both 16 MiB matrices of recipes/tiny.yaml stay gathered, BENCHMARKS.md
    issue 19 item 5)."""
    reuse = int(float(zero.get("stage3_max_reuse_distance", 1e9)))
    return min(total, largest_module + reuse // 2)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _name(spec: Mapping[str, Any]) -> str:
    return str(dict(spec).get("type", "softmax"))


def _check_shape(**values: int) -> None:
    for name, value in values.items():
        if value is None or int(value) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


def parse_heads(text: str) -> list[str]:
    """'softmax,cce' → ['softmax', 'cce'], every name a registered head."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in HEADS]
    if unknown or not names:
        what = f"unknown head {', '.join(map(repr, unknown))}" if unknown else "no head named"
        raise ValueError(f"--heads {text!r}: {what}; choose from {', '.join(HEADS)}")
    return list(dict.fromkeys(names))
