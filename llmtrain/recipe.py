"""The Recipe schema: one pydantic model drives validation, `recipe check` output and overrides.

Field descriptions double as documentation: `llmtrain recipe keys` prints them, head options
included. Values are normalized by their schema before anything stores or compares them: a head's
options are typed by the head's own schema with its defaults written out, so `1e-4`, `1.0e-4` and
`0.0001` are one value, and a default spelled out equals one left out.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmtrain.errors import UserError, problems_error
from llmtrain.heads import HEADS, head_class, parse_head_options
from llmtrain.heads.temperature import temperature_problems


CACHE_ENV = "LLMTRAIN_CACHE"  # the default data.cache_dir, e.g. one shared cache for every checkout


class Section(BaseModel):
    # inf and nan are no setting of any key (`train.lr=1e999` is a typo, not a learning rate)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    cache_dir: str = Field(default_factory=lambda: os.environ.get(CACHE_ENV, ".cache/llmtrain"),
                           description=f"where tokenizers and token shards are cached (default: ${CACHE_ENV} "
                           "when set, else .cache/llmtrain)")
    num_proc: int | None = Field(None, ge=1, description="processes tokenizing in parallel (default: the machine's cores)")
    shard_tokens: int = Field(1 << 26, ge=1024, description="tokens per shard file (uint32, so 4 bytes each)")
    document_mask: bool = Field(
        False, description="attention stays inside each document of a packed block and positions restart at each "
        "document (block-diagonal causal attention); our body only, not model.hf")


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
    launcher: Literal["deepspeed", "torchrun"] = Field(
        "deepspeed", description="process launcher for local runs: deepspeed (its conventions, --local_rank=N and "
        "RANK/WORLD_SIZE/MASTER_*, from llmtrain's launcher, which imports neither torch nor DeepSpeed) or torchrun")
    master_port: int | None = Field(None, ge=1024, le=65535, description="rendezvous port (default: a free one)")
    timeout_s: int = Field(
        600, ge=5, description="longest a rank may go without progress (a step, an eval pass, a checkpoint save, "
        "or start-up) before the whole job is ended: the collective timeout and the launcher's watchdog")


class HeadSection(BaseModel):
    """`type` picks the head; the remaining keys are that head's options, validated by the head."""

    model_config = ConfigDict(extra="allow")
    type: str = Field("softmax", description=f"output head: {' | '.join(HEADS)}")

    @model_validator(mode="before")
    @classmethod
    def _typed(cls, data: Any) -> Any:
        return normalize_head_spec(data) if isinstance(data, dict) else data


def normalize_head_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A head spec typed by the head's own schema, every default written out: what recipes store
    and what resume compares. A `temperature` entry (a checkpoint identity's) is kept as it is. A
    spec the head refuses is returned unchanged; validate_recipe reports its problems."""
    options = {k: v for k, v in spec.items() if k != "temperature"}
    try:
        cls, typed = parse_head_options(options)
    except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        return spec
    extra = {"temperature": spec["temperature"]} if "temperature" in spec else {}
    return {"type": cls.name, **typed.model_dump(), **extra}


class TemperatureConfig(Section):
    """TempNet (Qiu et al. 2024): per-token temperatures learned by the KL-constrained DRO loss
    τ·CE(o/τ, y) + τ·(ρ − log V). Defaults are the authors' GPT-2 setting."""

    enabled: bool = Field(False, description="train the temperature network with the head (softmax, cce or hsm)")
    tau_min: float = Field(0.5, gt=0, description="smallest temperature the network can predict (authors' GPT-2: 0.5)")
    tau_max: float = Field(5.0, gt=0, description="largest temperature (authors' GPT-2: 5; LLaMA: [0.01, 2])")
    rho: float = Field(8.0, ge=0, description="KL budget ρ: τ drives the tempered entropy towards log V − ρ (authors' GPT-2: 8)")
    width: int = Field(256, ge=1, description="hidden width of the network (authors: 256)")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout after the first layer (authors' code: 0.5)")
    init_tau: float | None = Field(
        None, gt=0, description="τ at initialization, set through the pooling bias (default: the authors' bias 0, "
        "τ near the middle of [tau_min, tau_max]; 1 starts from the untempered loss)")
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
        if self.init_tau is not None and not self.tau_min < self.init_tau < self.tau_max:
            raise ValueError(f"init_tau ({self.init_tau}) must lie strictly between tau_min ({self.tau_min}) and "
                             f"tau_max ({self.tau_max})")
        if self.enabled and self.mode == "frozen_body" and not self.init_from:
            raise ValueError("mode frozen_body needs temperature.init_from: the run or checkpoint to train on top of")
        if self.init_from and self.mode != "frozen_body":
            raise ValueError("init_from is used by mode frozen_body only; set temperature.mode=frozen_body or drop it")
        return self

    def network_options(self) -> dict[str, Any]:
        """The keyword arguments of heads.temperature.attach_temperature."""
        return self.model_dump(include={"width", "tau_min", "tau_max", "rho", "dropout", "init_tau"})

    def identity(self) -> dict[str, Any] | None:
        """What changes the trained model (not lr, init_from, nor init_tau: a resumed network's bias
        comes from its checkpoint): None when disabled."""
        if not self.enabled:
            return None
        return {**{k: v for k, v in self.network_options().items() if k != "init_tau"}, "mode": self.mode}


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

    @model_validator(mode="after")
    def _document_mask_body(self):
        if self.data.document_mask and self.model.hf:
            raise ValueError("data.document_mask: not supported with model.hf (Hugging Face bodies get no "
                             "block-diagonal mask here); set data.document_mask: false or use our body")
        return self


# ---------------------------------------------------------------------------- reading values


class _Loader(yaml.SafeLoader):
    """YAML as recipes are written: `1e-4` and `1E5` are numbers too (PyYAML reads YAML 1.1,
    whose numbers need `1.0e-4`), so a value is the same however it is spelled."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_value(text: str) -> Any:
    """One value as a recipe reads it (an override's, a --heads option's); ValueError naming what
    YAML could not read."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ValueError(_yaml_problem(e)) from None  # (an int past Python's digit limit is one already)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """YAML's complaint on one line, with its place (PyYAML's own text spans several lines and
    names the input "<unicode string>")."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    context = getattr(e, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f" ({context})" if context else "")


def read_yaml_file(path: Path) -> Any:
    """A YAML file's content; UserError naming the file (unreadable, not UTF-8, not YAML)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None
    try:
        return parse_value(text)
    except ValueError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None


def printable(text: str, limit: int = 80) -> str:
    """`text` safe for a one-line message: control characters and undecodable bytes escaped,
    long text cut."""
    if not text.isprintable():
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: Any) -> str:
    try:
        return printable(repr(value))
    except ValueError:  # an int past Python's int-string limit
        return "a number too long to print"


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
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        found = False
    if not found:
        raise UserError(f"recipe file not found: {printable(str(path), 200)}")
    raw = read_yaml_file(path)
    if raw is None:
        raw = {}
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
    numbers = _number_problems(Recipe, raw)
    for key in numbers:  # reported once, not again by rules that read the coerced value
        section, _, name = key.rpartition(".")
        (raw.get(section) if section else raw).pop(name)
    errors += numbers.values()
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
        raise problems_error(source, list(dict.fromkeys(errors)))
    return recipe


def _apply_override(raw: dict, item: str) -> str | None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        return f"override {_shown(item)}: write overrides as key=value, e.g. train.steps=200"
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            return f"override {printable(key)}: {printable('.'.join(parts[: i + 1]))} is not a section"
    try:
        value = parse_value(text) if text else None
    except ValueError as e:
        if text[0] in "[{\"'":  # meant as a list, mapping or quoted text
            return f"override {printable(key)}: {_shown(text)} is not valid YAML: {printable(str(e), 160)}"
        value = text  # words YAML cannot read, such as a glob (*.jsonl): the text itself
    node[parts[-1]] = value
    return None


def _describe(err: dict, model: type[BaseModel], prefix: tuple = ()) -> str:
    loc = prefix + tuple(err["loc"])
    key = printable(".".join(str(p) for p in loc)) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _fields_at(model, tuple(err["loc"][:-1]))
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        also = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(known)}"
        return f"{key}: unknown key; {also}"
    msg = err["msg"].removeprefix("Value error, ")
    msg = re.sub(r" or instance of \w+", " (a section of keys)", msg)  # no class names in a user's error
    shown = "" if err["type"] == "missing" or isinstance(err.get("input"), dict) else f" (got {_shown(err.get('input'))})"
    return f"{key}: {msg}{shown}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        sub = _section_model(getattr(field, "annotation", None))
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _types_in(annotation: Any) -> set:
    """The plain types a field accepts: `int | None` → {int, NoneType}, Literal[0, 1] → {int}."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return {type(a) for a in args}
    if origin in (typing.Union, types.UnionType):
        return set().union(*map(_types_in, args))
    return {annotation}


def _number_problems(model: type[BaseModel], raw: Any, prefix: str = "") -> dict[str, str]:
    """{dotted key: problem} for what pydantic's lax mode lets through: true/false where a number
    goes (it reads true as 1), integers past int64 (torch, numpy and DeepSpeed cannot hold them)."""
    if not isinstance(raw, dict):
        return {}
    problems = {}
    for name, field in model.model_fields.items():
        if name not in raw:
            continue
        value, key, accepted = raw[name], f"{prefix}{name}", _types_in(field.annotation)
        if (sub := _section_model(field.annotation)) is not None:
            problems.update(_number_problems(sub, value, f"{key}."))
        elif isinstance(value, bool) and bool not in accepted and accepted & {int, float}:
            problems[key] = f"{key}: a number goes here, not {str(value).lower()}"
        elif type(value) is int and int in accepted and not -(2**63) <= value < 2**63:
            problems[key] = f"{key}: too large (at most {2**63 - 1:,})"
    return problems


def _head_errors(head: Any, model: Any) -> list[str]:
    """The head's options are validated by the head's own schema (llmtrain/heads/<type>.py)."""
    if not isinstance(head, dict):
        return []  # Recipe validation already reported it
    spec = dict(head)
    name = spec.get("type", "softmax")
    if not isinstance(name, str) or name not in HEADS:
        hint = difflib.get_close_matches(str(name), list(HEADS), n=1)
        return [f"head.type: unknown head {_shown(name)}; " + (f"did you mean {hint[0]!r}?" if hint else f"choose one of {', '.join(HEADS)}")]
    numbers = _number_problems(head_class(name).Options, {k: v for k, v in spec.items() if k != "type"}, "head.")
    if numbers:
        return list(numbers.values())
    try:
        cls, _ = parse_head_options(spec)
    except ValidationError as e:
        return [_describe(err, head_class(name).Options, prefix=("head",)) for err in e.errors()]
    if isinstance(model, dict) and model.get("tie_embeddings") and not cls.supports_tying:
        if model.get("hf"):
            return [f"model.hf: {model['hf']} ties its embedding to lm_head (tie_word_embeddings), and the {name} "
                    "head has no single (vocab × d_model) weight to share; choose a head that can tie "
                    f"({', '.join(n for n in HEADS if head_class(n).supports_tying)}) or an untied model"]
        return [f"model.tie_embeddings: the {name} head has no single (vocab × d_model) weight to share; set it to false"]
    return []


def parse_head_specs(text: str, flag: str = "--heads") -> list[tuple[str, dict[str, Any]]]:
    """`softmax,cce:chunk_size=256:filter_eps=1e-4` → [(entry, head spec)]: registered heads, each
    optionally followed by options as in a recipe's head section; one syntax for every command.
    Each spec is validated and normalized (typed, defaults written out); UserError naming `flag`."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise UserError(f"{flag} {_shown(text)}: name at least one head: {', '.join(HEADS)}")
    specs, problems = [], []
    for entry in entries:
        name, *pairs = entry.split(":")
        spec: dict[str, Any] = {"type": name}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not (sep and key):
                problems.append(f"{printable(entry)}: write options as key=value, e.g. cce:chunk_size=256")
                continue
            try:
                spec[key] = parse_value(value) if value else None
            except ValueError:
                spec[key] = value
        errors = _head_errors(spec, {})
        problems += [f"{printable(entry)}: {e}" for e in errors]
        if not errors:
            specs.append((entry, normalize_head_spec(spec)))
    if problems:
        raise UserError(f"{flag}: " + "; ".join(problems))
    return specs


# ---------------------------------------------------------------------------- documentation


class KeyDoc(NamedTuple):
    key: str  # dotted, e.g. train.steps
    type: str
    default: str  # as YAML writes it
    description: str
    heads: tuple[str, ...] = ()  # head options: the head types that take it


def recipe_keys() -> list[KeyDoc]:
    """Every key a recipe can set, from the schema: sections' fields, then each head's options
    (an option shared by several heads once, naming them)."""
    docs = []
    for name, field in Recipe.model_fields.items():
        section = _section_model(field.annotation)
        if section is None:
            docs.append(_key_doc(name, field))
        elif section is HeadSection:
            docs.append(_key_doc("head.type", HeadSection.model_fields["type"]))
            options: dict[KeyDoc, list[str]] = {}
            for head in HEADS:
                for option, f in head_class(head).Options.model_fields.items():
                    options.setdefault(_key_doc(f"head.{option}", f), []).append(head)
            docs += [doc._replace(heads=tuple(heads)) for doc, heads in options.items()]
        else:
            docs += [_key_doc(f"{name}.{key}", f) for key, f in section.model_fields.items()]
    return docs


def _key_doc(key: str, field: Any) -> KeyDoc:
    default = field.get_default(call_default_factory=True)
    default = list(default) if isinstance(default, tuple) else default
    text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
    return KeyDoc(key, _type_name(field.annotation), text, field.description or "")


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin is tuple:
        return "[" + ", ".join(map(_type_name, args)) + "]"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation)).replace("str", "text")


# ---------------------------------------------------------------------------- shipped recipes

# The repository's recipes/ folder: llmtrain/recipes links to it, so a source checkout and an
# installed wheel (which packages the files through that link) find them at the same place.
SHIPPED_DIR = Path(__file__).parent / "recipes"


def shipped_recipes() -> dict[str, tuple[Path, str]]:
    """{name: (file, the first line of its opening comment: a summary)} of the shipped recipes."""
    found = {}
    for path in sorted(SHIPPED_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        found[path.stem] = (path, first.lstrip("# ").strip())
    return found


def copy_recipe(name: str, dest: Path) -> list[Path]:
    """Copy the shipped recipe `name` to `dest` (a file, or a folder to put NAME.yaml in); a model
    folder it ships with (model.hf under recipes/) is copied beside it and the recipe pointed there.
    Nothing is overwritten. Returns what was written."""
    import shutil

    recipes = shipped_recipes()
    if name not in recipes:
        hint = difflib.get_close_matches(name, list(recipes), n=1)
        raise UserError(f"recipe copy {name!r}: no such shipped recipe; "
                        + (f"did you mean {hint[0]!r}?" if hint else f"choose one of {', '.join(recipes)}"))
    source = recipes[name][0]
    if dest.is_dir():
        dest = dest / source.name
    text = source.read_text()
    hf = ((read_yaml_file(source) or {}).get("model") or {}).get("hf")
    folder = SHIPPED_DIR / Path(hf).name if hf and Path(hf).parts[:1] == ("recipes",) else None
    targets = [dest] + ([dest.parent / folder.name] if folder is not None and folder.is_dir() else [])
    taken = [t for t in targets if t.exists()]
    if taken:
        raise UserError(f"recipe copy: {taken[0]} exists; choose another DEST (nothing was written)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if len(targets) > 1:
        shutil.copytree(folder, targets[1])
        text = text.replace(f"hf: {hf}", f"hf: {targets[1].as_posix()}", 1)
    dest.write_text(text)
    return targets
