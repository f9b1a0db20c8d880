"""The Recipe schema: one pydantic model drives validation, `recipe check` output and overrides.

Field descriptions double as documentation: `llmtrain recipe check --doc` prints them.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmtrain.errors import UserError
from llmtrain.heads import HEADS, head_class, parse_head_options
from llmtrain.heads.temperature import temperature_problems


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = Field(
        "stdlib",
        description="'stdlib' (the running Python's standard library source, always on disk), a path "
        "or glob of .txt/.py/.jsonl/.parquet files or a directory of them, or 'hf:NAME' for a "
        "Hugging Face dataset (needs network)",
    )
    text_field: str = Field("text", description="column holding the text in JSONL/Parquet/HF data")
    hf_config: str | None = Field(None, description="Hugging Face dataset configuration name")
    hf_split: str = Field("train", description="Hugging Face dataset split")
    max_bytes: int | None = Field(None, gt=0, description="read at most this many bytes of text (documents in sorted order)")
    val_fraction: float = Field(0.02, gt=0, lt=0.5, description="share of documents held out for validation")
    cache_dir: str = Field(".cache/llmtrain", description="where tokenizers and packed datasets are cached")


class TokenizerConfig(Section):
    vocab_size: int = Field(32768, ge=260, le=2_000_000, description="byte-level BPE vocabulary size when training one")
    path: str | None = Field(None, description="load this tokenizer.json instead of training one")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a BPE merge")
    train_bytes: int | None = Field(None, gt=0, description="train the tokenizer on at most this many bytes of text")


class ModelConfig(Section):
    hf: str | None = Field(
        None, description="a local Hugging Face model folder (config.json, optionally *.safetensors weights and "
        "tokenizer.json): its base model is the body, its lm_head the softmax/cce head's weight; the architecture "
        "fields below are then read from its config.json")
    layers: int = Field(4, ge=1, description="transformer blocks")
    d_model: int = Field(256, ge=8, description="hidden size")
    n_heads: int = Field(4, ge=1, description="attention heads (d_model must divide by it)")
    ffn_hidden: int | None = Field(None, ge=8, description="SwiGLU inner size (default: 8/3·d_model rounded up to 64)")
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    tie_embeddings: bool = Field(False, description="share the input embedding with the head's output weight")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    init_std: float = Field(0.02, gt=0, description="std of the normal init of linear and embedding weights")
    activation_checkpointing: bool = Field(
        False, description="recompute each block's activations in the backward pass instead of keeping them: "
        "less memory; each block's forward runs a second time (our body and Hugging Face bodies)")

    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this model must match: not activation checkpointing (the same
        weights and math); `hf` only when set, so checkpoints from before it existed still match."""
        return self.model_dump(exclude={"activation_checkpointing", *(["hf"] if self.hf is None else [])})

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hf is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class TrainConfig(Section):
    steps: int = Field(300, ge=1, description="optimizer steps in the whole schedule")
    micro_batch: int = Field(8, ge=1, description="sequences per rank per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(3e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(30, ge=0, description="linear warm-up steps from 0 to lr")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only; not norms, biases)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = off)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 (DeepSpeed bf16 mode, fp32 master weights)")
    seed: int = Field(1234, description="seeds the model init, the data order and every RNG")
    log_every: int = Field(10, ge=1, description="steps between metric records")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss or gradient norm, or a step DeepSpeed skipped for overflow: stop "
        "(save nothing, exit 3 naming the step and the last good checkpoint) or skip the step (its update is not "
        "applied) and go on")
    max_skipped: int = Field(10, ge=1, description="with on_nonfinite=skip: stop after this many skipped steps in a row")

    @model_validator(mode="after")
    def _schedule(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        return self


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 (DDP), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload of optimizer states (stage ≥ 1)")
    offload_param: Literal["none", "cpu"] = Field("none", description="ZeRO-Infinity parameter offload (stage 3 only)")
    config: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config merged last (expert escape hatch)")

    @model_validator(mode="after")
    def _offload(self):
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage ≥ 1")
        return self


class CheckpointConfig(Section):
    every: int = Field(100, ge=1, description="steps between checkpoints (one is also saved at the end)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept; older ones are deleted")


class EvalConfig(Section):
    every: int = Field(100, ge=1, description="steps between validation passes (one also runs at the end)")
    batches: int = Field(8, ge=1, description="validation micro-batches per rank per pass")


class LaunchConfig(Section):
    ranks_per_node: int = Field(2, ge=1, description="worker processes per node (GPUs per node on a cluster)")
    nodes: int = Field(1, ge=1, description="nodes (more than 1 needs --hostfile or SLURM)")
    launcher: Literal["deepspeed", "torchrun"] = Field("deepspeed", description="process launcher for local runs")
    master_port: int | None = Field(None, ge=1024, le=65535, description="rendezvous port (default: a free one)")
    timeout_s: int = Field(
        600, ge=5, description="longest a rank may go without progress (a step, an eval pass, a checkpoint save, "
        "or start-up) before the whole job is ended: the collective timeout and the launcher's watchdog")


class HeadSection(BaseModel):
    """`type` picks the head; the remaining keys are that head's options, validated by the head."""

    model_config = ConfigDict(extra="allow")
    type: str = Field("softmax", description=f"output head: {' | '.join(HEADS)}")


class TemperatureConfig(Section):
    """TempNet (Qiu et al. 2024): per-token temperatures learned by the KL-constrained DRO loss
    τ·CE(o/τ, y) + τ·(ρ − log V). Defaults are the authors' GPT-2 setting."""

    enabled: bool = Field(False, description="train the temperature network with the head (softmax, cce or hsm)")
    tau_min: float = Field(0.5, gt=0, description="smallest temperature the network can predict (authors' GPT-2: 0.5)")
    tau_max: float = Field(5.0, gt=0, description="largest temperature (authors' GPT-2: 5; LLaMA: [0.01, 2])")
    rho: float = Field(8.0, ge=0, description="KL budget ρ: τ drives the tempered entropy towards log V − ρ (authors' GPT-2: 8)")
    width: int = Field(256, ge=1, description="hidden width of the network (authors: 256)")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout after the first layer (authors' code: 0.5)")
    lr: float = Field(2e-6, gt=0, description="the network's own learning rate (authors' GPT-2: constant 2e-6)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant, or cosine: follow train.* warm-up and decay scaled to lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the network's matrices")
    mode: Literal["joint", "frozen_body"] = Field(
        "joint", description="joint: train everything; frozen_body: train only the network on top of init_from "
        "(the authors' LLaMA-2 setting)")
    init_from: str | None = Field(
        None, description="frozen_body: the run folder, its checkpoints/ folder or a checkpoints/stepNNNNNNNN folder "
        "whose body and head weights are loaded (module weights only) and kept fixed")

    @model_validator(mode="after")
    def _consistent(self):
        if self.tau_min >= self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be below tau_max ({self.tau_max})")
        if self.enabled and self.mode == "frozen_body" and not self.init_from:
            raise ValueError("mode frozen_body needs temperature.init_from: the run or checkpoint to train on top of")
        if self.init_from and self.mode != "frozen_body":
            raise ValueError("init_from is used by mode frozen_body only; set temperature.mode=frozen_body or drop it")
        return self

    def network_options(self) -> dict[str, Any]:
        """The keyword arguments of heads.temperature.attach_temperature."""
        return self.model_dump(include={"width", "tau_min", "tau_max", "rho", "dropout"})

    def identity(self) -> dict[str, Any] | None:
        """What changes the trained model (not lr, init_from): None when disabled."""
        if not self.enabled:
            return None
        return {**self.network_options(), "mode": self.mode}


# A run name goes into file names (runs/<name>-<time>) and the SLURM script: no separators, no shell.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class Recipe(Section):
    name: str | None = Field(None, description="run name: letters, digits, '_', '.', '-' (up to 100, not starting "
                             "with '.' or '-'; default: the recipe file's name)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    head: HeadSection = Field(default_factory=HeadSection)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    temperature: TemperatureConfig = Field(default_factory=TemperatureConfig)

    @property
    def world_size(self) -> int:
        return self.launch.ranks_per_node * self.launch.nodes

    def head_spec(self) -> dict[str, Any]:
        return self.head.model_dump()

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the model, the head (with its temperature
        network, when enabled) and the tokenizer."""
        head = self.head_spec()
        if self.temperature.enabled:
            head["temperature"] = self.temperature.identity()
        return {"model": self.model.identity(), "head": head, "tokenizer": self.tokenizer.model_dump()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def safe_name(text: str) -> str:
    """A run name made from free text (a file or folder name): unsafe characters become '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text).lstrip(".-")[:100] or "run"


def input_problems(recipe: Recipe) -> list[str]:
    """Checks of what a user hands in, beyond the schema; recipes stored in runs and checkpoints
    by older versions are not re-judged by them."""
    problems = []
    if recipe.name is not None and not SAFE_NAME.match(recipe.name):
        problems.append(f"name: {recipe.name!r} is not a safe run name; use letters, digits, '_', '.' and '-' only "
                        "(up to 100 characters, starting with a letter or digit): it becomes part of file names and "
                        "the SLURM script")
    problems += [f"{c} (set the recipe key instead)" for c in deepspeed_config_conflicts(recipe)]
    return problems


def deepspeed_config_conflicts(recipe: Recipe) -> list[str]:
    """Keys of the raw `deepspeed.config` that set, to another value, what a validated recipe key
    decides: "deepspeed.config.X=a contradicts recipe.key=b" for each. The same value is allowed."""
    t, d, raw = recipe.train, recipe.deepspeed, recipe.deepspeed.config
    owned = {
        ("zero_optimization", "stage"): ("deepspeed.zero_stage", d.zero_stage),
        ("zero_optimization", "offload_optimizer", "device"): ("deepspeed.offload_optimizer", d.offload_optimizer),
        ("zero_optimization", "offload_param", "device"): ("deepspeed.offload_param", d.offload_param),
        ("train_micro_batch_size_per_gpu",): ("train.micro_batch", t.micro_batch),
        ("gradient_accumulation_steps",): ("train.grad_accum", t.grad_accum),
        ("train_batch_size",): ("train.micro_batch × train.grad_accum × ranks", t.micro_batch * t.grad_accum * recipe.world_size),
        ("gradient_clipping",): ("train.grad_clip", t.grad_clip),
        ("optimizer", "params", "lr"): ("train.lr", t.lr),
        ("optimizer", "params", "weight_decay"): ("train.weight_decay", t.weight_decay),
        ("optimizer", "params", "betas"): ("train.betas", list(t.betas)),
        ("bf16", "enabled"): ("train.precision", t.precision == "bf16"),
        ("fp16", "enabled"): ("train.precision", False),
    }
    conflicts = []
    for path, (key, value) in owned.items():
        node: Any = raw
        for part in path:
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and _normalized(node) != _normalized(value):
            shown = t.precision if key == "train.precision" else value
            conflicts.append(f"deepspeed.config.{'.'.join(path)}={node!r} contradicts {key}={shown!r}")
    if "scheduler" in raw:
        conflicts.append("deepspeed.config.scheduler contradicts train.lr/min_lr/warmup_steps (llmtrain sets the LR "
                         "every step)")
    return conflicts


_ABSENT = object()


def _normalized(value: Any) -> Any:
    """Compare 3 with 3.0 and a tuple with a list; 'none' offload with a missing one."""
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


# ---------------------------------------------------------------------------- loading and errors


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply dotted `key=value` overrides, validate everything, and raise one
    UserError that lists every problem (key, bad value, what is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, head, data, train, ...)")
    raw.setdefault("name", safe_name(path.stem))
    return validate_recipe(raw, overrides, source=str(path))


def validate_recipe(raw: dict[str, Any], overrides: Sequence[str] = (), source: str = "recipe") -> Recipe:
    raw = copy.deepcopy(raw)
    errors = [e for item in overrides if (e := _apply_override(raw, item))]
    if isinstance(raw.get("model"), dict) and raw["model"].get("hf"):
        # The one lazy edge from the recipe to the model package: a Hugging Face folder's config
        # decides the architecture fields, which the resolved recipe then shows.
        from llmtrain.model.hf import resolve_recipe_fields

        errors += resolve_recipe_fields(raw)
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
        errors += input_problems(recipe)
    except ValidationError as e:
        errors += [_describe(err, Recipe) for err in e.errors()]
    head_errors = _head_errors(raw.get("head") or {}, raw.get("model") or {})
    errors += head_errors
    head, temperature = raw.get("head") or {}, raw.get("temperature") or {}
    if isinstance(head, dict) and isinstance(temperature, dict) and temperature.get("enabled") is True and not head_errors:
        errors += temperature_problems(head_class(head.get("type", "softmax")), head)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise UserError(f"{source}: {len(errors)} problem{'s' if len(errors) > 1 else ''}:\n{lines}")
    return recipe


def _apply_override(raw: dict, item: str) -> str | None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        return f"override {item!r}: write overrides as key=value, e.g. train.steps=200"
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section"
    node[parts[-1]] = yaml.safe_load(value) if value else None
    return None


def _describe(err: dict, model: type[BaseModel], prefix: tuple = ()) -> str:
    loc = prefix + tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _fields_at(model, tuple(err["loc"][:-1]))
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        also = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(known)}"
        return f"{key}: unknown key; {also}"
    msg = err["msg"].removeprefix("Value error, ")
    shown = "" if err["type"] == "missing" or isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
    return f"{key}: {msg}{shown}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _head_errors(head: Any, model: Any) -> list[str]:
    """The head's options are validated by the head's own schema (llmtrain/heads/<type>.py)."""
    if not isinstance(head, dict):
        return []  # Recipe validation already reported it
    spec = dict(head)
    name = spec.get("type", "softmax")
    if name not in HEADS:
        hint = difflib.get_close_matches(str(name), list(HEADS), n=1)
        return [f"head.type: unknown head {name!r}; " + (f"did you mean {hint[0]!r}?" if hint else f"choose one of {', '.join(HEADS)}")]
    try:
        cls, _ = parse_head_options(spec)
    except ValidationError as e:
        return [_describe(err, head_class(name).Options, prefix=("head",)) for err in e.errors()]
    if isinstance(model, dict) and model.get("tie_embeddings") and not cls.supports_tying:
        if model.get("hf"):
            return [f"model.hf: {model['hf']} ties its embedding to lm_head (tie_word_embeddings), and the {name} "
                    "head has no single [vocab, d_model] weight to share; choose a head that can tie "
                    f"({', '.join(n for n in HEADS if head_class(n).supports_tying)}) or an untied model"]
        return [f"model.tie_embeddings: the {name} head has no single [vocab, d_model] weight to share; set it to false"]
    return []
