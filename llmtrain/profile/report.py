"""`llmtrain profile`: the memory of each head choice for a recipe, a preset or a bare shape —
estimated per rank by component (profile/estimate.py), measured on this device
(profile/measure.py), judged against a budget, written as JSON and plotted.

The command is a plain function with Typer-annotated parameters; the CLI registers it with
`app.command("profile")(user_errors(profile))`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmtrain.errors import UserError

# The CCE paper's Table 1 (Wijmans et al. 2024; A100, bf16, 8,192 tokens × 256,000 × 2,304; its
# "MB" are MiB: 1,161 MB = ∇W + ∇h in bf16): loss + gradient memory.
CCE_TABLE1_MIB = {"softmax": (28_000, "eager loss + gradient"), "cce": (1_164, "CCE loss + gradient"),
                  "lower bound": (1_161, "∇W + ∇h")}
COMPONENTS = [("parameters", "params"), ("gradients", "grads"), ("optimizer_states", "optimizer"),
              ("zero_buffers", "ZeRO buffers"), ("zero3_gathered", "ZeRO-3 gathered"),
              ("activations", "activations"), ("recomputed", "recomputed layer"),
              ("layer_backward", "layer backward"), ("head_transient", "head transient")]
PLOT_VOCABS = [2**k for k in range(12, 22)]
PRESET_CHOICES = tuple(sorted(p.name for p in (Path(__file__).parent / "presets").iterdir() if p.is_dir()))
DEFAULT_DTYPE = "fp32"  # as train.precision's default and `bench heads`


@dataclass
class Target:
    """What is profiled: a recipe (or preset), or a bare head shape (recipe is None)."""

    label: str
    tokens: int
    vocab: int
    hidden: int
    precision: str
    recipe: Any = None  # llmtrain.recipe.Recipe
    world_size: int = 1
    recipe_file: bool = False  # a recipe file, which may run here; presets and --hf describe clusters


def profile(
    recipe_path: Optional[Path] = typer.Argument(None, metavar="[RECIPE]", help="recipe YAML file", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value recipe overrides (also after --preset "
                                                    "or --hf)", show_default=False, metavar="[KEY=VALUE]..."),
    preset: Optional[Literal[PRESET_CHOICES]] = typer.Option(None, help="a published architecture instead of a recipe "
                                                             "(its config.json ships with llmtrain)", show_default=False),
    hf: Optional[Path] = typer.Option(None, "--hf", help="a Hugging Face model folder instead of a recipe (config.json alone "
                                      "is enough; nothing is downloaded or allocated)", show_default=False),
    tokens: Optional[int] = typer.Option(None, min=1, help="bare shape: tokens per step (with --vocab, --hidden)"),
    vocab: Optional[int] = typer.Option(None, min=1, help="bare shape: vocabulary size"),
    hidden: Optional[int] = typer.Option(None, min=1, help="bare shape: hidden size"),
    dtype: Optional[Literal["fp32", "bf16"]] = typer.Option(None, help=f"bare shape: the dtype [default: {DEFAULT_DTYPE}]",
                                                          show_default=False),
    heads: Optional[str] = typer.Option(None, help="comma-separated heads to compare, each optionally with options as in "
                                        "a recipe, e.g. softmax,cce:chunk_size=512 [default: every registered head]",
                                        show_default=False),
    world_size: Optional[int] = typer.Option(None, min=1, help="ranks [default: the recipe's launch.ranks_per_node × launch.nodes]"),
    zero_stage: Optional[int] = typer.Option(None, min=0, max=3, help="ZeRO stage [default: the recipe's]"),
    budget: Optional[str] = typer.Option(None, help="memory per rank with its unit, e.g. 80GB or 80GiB: fits or not, and "
                                         "what would make it fit"),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="also measure on this device (fresh process per head)"),
    snapshot: Optional[Path] = typer.Option(None, help="CUDA: dump the allocator history of each measured step into this folder"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write estimates and measurements to this JSON file "
                                             "('-': to stdout, the report then goes to stderr)"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG of head memory against vocabulary size"),
):
    """Memory of each head choice per rank: estimated by component for any shape, measured on this device.

    Examples:

    \b
      llmtrain profile recipes/tiny.yaml --budget 8GB --no-measure
      llmtrain profile --preset llama3-8b --world-size 8 --zero-stage 3 --budget 80GB --no-measure
      llmtrain profile --preset llama3-8b model.activation_checkpointing=true train.micro_batch=2 --no-measure
      llmtrain profile --hf recipes/hf-tiny-qwen2 --heads softmax,cce:chunk_size=512,hsm --budget 80GiB --no-measure
      llmtrain profile --tokens 8192 --vocab 256000 --hidden 2304 --dtype bf16 --no-measure --json -
    """
    from llmtrain.profile.estimate import parse_budget
    from llmtrain.recipe import parse_head_specs

    to_stdout = json_path == Path("-")
    console = Console(stderr=to_stdout, markup=False, emoji=False, highlight=False, soft_wrap=True)  # plain text: labels hold paths
    try:
        budget_bytes = parse_budget(budget) if budget is not None else None
    except ValueError as e:
        raise UserError(str(e)) from None
    head_specs = dict(parse_head_specs(heads)) if heads is not None else None
    target = _target(recipe_path, overrides or [], preset, hf, tokens, vocab, hidden, dtype, world_size, zero_stage)
    if snapshot is not None:
        _check_snapshot(snapshot, measure)
    report = build_report(target, head_specs, budget_bytes, measure, snapshot, preset, budget)
    render(console, report)
    if to_stdout:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {json_path}")
    if plot is not None:
        write_plot(plot, target, {label: h["spec"] for label, h in report["heads"].items()}, budget_bytes)
        console.print(f"wrote {plot}")


def _size(n: float) -> str:
    from llmtrain.train.memory import format_bytes  # imports torch: only once there is something to print

    return format_bytes(n)


# ----------------------------------------------------------------------------- inputs


def _target(recipe_path, overrides, preset, hf, tokens, vocab, hidden, dtype, world_size, zero_stage) -> Target:
    from llmtrain.profile.estimate import PRECISION_DTYPES, PRESET_NAMES, PRESETS, recipe_with
    from llmtrain.recipe import load_recipe, validate_recipe

    if (preset is not None or hf is not None) and recipe_path is not None and "=" in str(recipe_path) \
            and not recipe_path.exists():
        # Without a recipe file the first override lands in the RECIPE argument's place.
        overrides, recipe_path = [str(recipe_path), *overrides], None
    shape_given = [name for name, v in (("--tokens", tokens), ("--vocab", vocab), ("--hidden", hidden),
                                        ("--dtype", dtype)) if v is not None]
    sources = [s for s, given in (("a recipe", recipe_path), ("--preset", preset), ("--hf", hf),
                                  ("a shape", shape_given)) if given]
    if len(sources) != 1:
        raise UserError("give one of: a recipe file, --preset NAME (" + ", ".join(PRESETS) + "), --hf FOLDER, or a "
                        f"shape --tokens/--vocab/--hidden [--dtype]; got {' and '.join(sources) or 'none'}")
    if shape_given:
        missing = [n for n, v in (("--tokens", tokens), ("--vocab", vocab), ("--hidden", hidden)) if v is None]
        if missing:
            raise UserError(f"a bare shape needs --tokens, --vocab and --hidden; missing {', '.join(missing)}")
        for flag, value in (("--tokens", tokens), ("--vocab", vocab), ("--hidden", hidden)):
            if value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value}")
        precision = dtype or DEFAULT_DTYPE
        if precision not in PRECISION_DTYPES:
            raise UserError(f"--dtype {precision!r}: choose {' or '.join(PRECISION_DTYPES)}")
        if world_size is not None or zero_stage is not None or overrides:
            raise UserError("--world-size, --zero-stage and overrides apply to a recipe, --preset or --hf, not a bare shape")
        return Target(f"{tokens} tokens × vocabulary {vocab} × hidden {hidden}, {precision}",
                      tokens, vocab, hidden, precision)
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"--preset {preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
        recipe = validate_recipe(PRESETS[preset], overrides, source=f"--preset {preset}")
        label = f"preset {preset} ({PRESET_NAMES[preset]}'s published config.json)"
    elif hf is not None:
        recipe = validate_recipe(_hf_recipe(hf), overrides, source=f"--hf {hf}")
        label = f"Hugging Face model {hf}"
    else:
        recipe = load_recipe(recipe_path, overrides)
        label = f"recipe {recipe_path}"
    if zero_stage is not None:
        recipe = recipe_with(recipe, deepspeed={"zero_stage": zero_stage})
    vocab_size = recipe_vocab(recipe)
    return Target(label, recipe.train.micro_batch * recipe.model.seq_len, vocab_size, recipe.model.d_model,
                  recipe.train.precision, recipe, world_size or recipe.world_size,
                  recipe_file=preset is None and hf is None)


def _hf_recipe(folder: Path) -> dict[str, Any]:
    """--hf FOLDER: the folder checked (errors name --hf), at 8,192 tokens per sequence or the
    longest the model takes."""
    from llmtrain.model.hf import read_hf_folder
    from llmtrain.profile.estimate import hf_recipe
    from llmtrain.recipe import safe_name

    config = read_hf_folder(folder, key="--hf").config
    longest = getattr(config, "max_position_embeddings", None) or 8192
    return hf_recipe(folder, safe_name(folder.name), seq_len=min(8192, int(longest)))


def recipe_vocab(recipe) -> int:
    """The vocabulary the model is built with: a Hugging Face model's config's (its embedding and
    lm_head; a tokenizer may use fewer ids), else a given tokenizer file's, else the configured size."""
    if recipe.model.hf:
        from llmtrain.model.hf import read_hf_folder

        return read_hf_folder(recipe.model.hf).vocab_size
    path = recipe.tokenizer.path
    if path and Path(path).is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path).get_vocab_size()
    return recipe.tokenizer.vocab_size


def _check_snapshot(folder: Path, measure: bool) -> None:
    import torch

    if not measure:
        raise UserError("--snapshot records a measured step; drop --no-measure")
    if not torch.cuda.is_available():
        raise UserError("--snapshot records the CUDA allocator's history; this machine has no CUDA device")


# ----------------------------------------------------------------------------- the report


def build_report(target: Target, head_specs: dict[str, dict] | None, budget: int | None, measure: bool,
                 snapshot: Path | None, preset: str | None, budget_text: str | None = None) -> dict[str, Any]:
    """Everything `--json` writes: the target, and per head its estimate, verdict and measurement.
    `head_specs`: {label: head spec} as `--heads` gives them (None: every registered head); a bare
    head name takes the target's own settings for it (the recipe's options, a model's softcap)."""
    from llmtrain.heads import HEADS, head_class
    from llmtrain.profile.estimate import (deepspeed_model_states, estimate_head, estimate_recipe, fixes_for_recipe,
                                       fixes_for_shape, recipe_with)

    specs = {label: spec if ":" in label else _spec_for(target, spec["type"])
             for label, spec in (head_specs or {n: {"type": n} for n in HEADS}).items()}
    report: dict[str, Any] = {
        "target": {"label": target.label, "tokens": target.tokens, "vocab": target.vocab, "hidden": target.hidden,
                   "precision": target.precision, "world_size": target.world_size if target.recipe else None,
                   "zero_stage": target.recipe.deepspeed.zero_stage if target.recipe else None,
                   "hf": target.recipe.model.hf if target.recipe else None,
                   "activation_checkpointing": target.recipe.model.activation_checkpointing if target.recipe else None},
        "budget": budget_text or (_size(budget) if budget else None),
        "budget_bytes": budget,
        "heads": {},
        "notes": [],
    }
    runtime = _runtime_here(target)
    if runtime:
        report["runtime_on_cpu_bytes"] = runtime
    for name, spec in specs.items():
        if target.recipe is not None:
            recipe = recipe_with(target.recipe, head=spec)
            if recipe.temperature.enabled and not head_class(spec["type"]).supports_temperature:
                recipe = recipe_with(recipe, temperature={"enabled": False})
                report["notes"].append(f"{name}: estimated without the temperature network, which it cannot serve")
            if target.recipe.model.tie_embeddings and not recipe.model.tie_embeddings:
                report["notes"].append(f"{name}: cannot share the model's tied embedding; estimated with output "
                                       "weights of its own")
            est = estimate_recipe(recipe, target.vocab, target.world_size)
            fixes = fixes_for_recipe(recipe, target.vocab, target.world_size, budget) if budget and est.total > budget else []
            ds = deepspeed_model_states(recipe, target.vocab, target.world_size)
        else:
            est = estimate_head(spec, target.tokens, target.hidden, target.vocab, target.precision)
            fixes = (fixes_for_shape(spec, target.tokens, target.hidden, target.vocab, target.precision, budget)
                     if budget and est.total > budget else [])
            ds = None
        entry: dict[str, Any] = {"spec": spec, "estimate": est.to_json()}
        if runtime and est.total_on_cpu is not None:
            entry["estimate"]["total_on_this_cpu"] = est.total_on_cpu + runtime
        if est.params is not None:
            entry["parameter_count"] = {"total": est.params.total, "head": est.params.head}
        if ds is not None:
            entry["deepspeed_estimator_model_states"] = ds
        if budget:
            entry["fits"] = est.total <= budget
            entry["fixes"] = [{"change": f.change, "total": f.total} for f in fixes]
        report["heads"][name] = entry
        report["notes"] += [n for n in est.notes if n not in report["notes"]]
    if measure:
        measure_heads(report, target, specs, snapshot)
    if preset == "gemma2-2b":
        report["reference"] = {"source": "Wijmans et al. 2024, Cut Your Losses in Large-Vocabulary Language Models, Table 1",
                               **{k: {"bytes": mib * 2**20, "what": what} for k, (mib, what) in CCE_TABLE1_MIB.items()}}
    return report


def _runtime_here(target: Target) -> int | None:
    """A recipe file profiled on a machine without CUDA describes a run on this CPU: its ranks'
    resident sets also hold the libraries and kernels (measured in a fresh process) and only the written part
    of DeepSpeed's buckets. Presets and --hf describe clusters: None."""
    import torch

    if not target.recipe_file or torch.cuda.is_available():
        return None
    from llmtrain.profile.measure import runtime_bytes

    return runtime_bytes(target.recipe.model.hf)


def _spec_for(target: Target, name: str) -> dict[str, Any]:
    """The recipe's own head keeps its options; the others run with their defaults, and with a
    Hugging Face model's final-logit softcap when they stand in for its lm_head."""
    if target.recipe is None:
        return {"type": name}
    if target.recipe.head.type == name:
        return target.recipe.head_spec()
    from llmtrain.profile.estimate import recipe_with

    return recipe_with(target.recipe, head={"type": name}).head_spec()


def measure_heads(report: dict, target: Target, specs: dict, snapshot: Path | None) -> None:
    """Measure each head's forward + backward at the target's shape, and with a recipe one training
    step, each head in its own fresh process; what the estimate says will not fit is skipped."""
    from llmtrain.profile.measure import measure
    from llmtrain.profile.estimate import estimate_head, estimate_recipe, recipe_with

    if target.recipe is not None and target.recipe.temperature.enabled:
        report["notes"].append("the measured training step runs without the temperature network")
    for name, spec in specs.items():
        entry = report["heads"][name]
        jobs = [{"kind": "head", "head": spec, "tokens": target.tokens, "vocab": target.vocab,
                 "hidden": target.hidden, "dtype": target.precision,
                 "need": estimate_head(spec, target.tokens, target.hidden, target.vocab, target.precision).total,
                 "snapshot": str(snapshot / f"{name}-head.pickle") if snapshot else None}]
        compare = [{"estimate": "head_total", "bytes": entry["estimate"]["head_total"]}]
        if target.recipe is not None:
            # One process, so no partitioning: the estimate to compare with is ZeRO-0 on one rank.
            # The measured step has no temperature network, and neither has its estimate.
            one_rank = recipe_with(target.recipe, head=spec, temperature={"enabled": False}, deepspeed={
                "zero_stage": 0, "offload_optimizer": "none", "offload_param": "none", "config": {}})
            one_rank_total = estimate_recipe(one_rank, target.vocab, 1).total
            jobs.append({"kind": "step", "recipe": one_rank.model_dump(mode="json"), "vocab": target.vocab,
                         "need": one_rank_total, "snapshot": str(snapshot / f"{name}-step.pickle") if snapshot else None})
            compare.append({"estimate": "total at world size 1, ZeRO-0 (one process, no partitioning)",
                            "bytes": one_rank_total})
        entry["measured"] = {}
        for job, result, against in zip(jobs, measure(jobs), compare):
            if "bytes" in result:
                result["compare_with"] = against
            entry["measured"]["head_forward_backward" if job["kind"] == "head" else "training_step"] = result


# ----------------------------------------------------------------------------- output


def render(console: Console, report: dict) -> None:
    heads = report["heads"]
    budget = report["budget_bytes"]
    console.print(Text.assemble(("Memory per rank", "bold"), f": {report['target']['label']}"))
    table = Table()
    table.add_column("")
    for name in heads:
        table.add_column(name, justify="right")
    for key, title in COMPONENTS:
        if any(h["estimate"].get(key) for h in heads.values()):
            table.add_row(title, *(_size(h["estimate"][key]) for h in heads.values()))
    table.add_row("head total", *(_size(h["estimate"]["head_total"]) for h in heads.values()), end_section=True)
    table.add_row(Text("total / rank", "bold"), *(Text(_size(h["estimate"]["total"]), "bold") for h in heads.values()))
    if report.get("runtime_on_cpu_bytes"):
        table.add_row("on this CPU", *(_size(h["estimate"]["total_on_this_cpu"]) for h in heads.values()))
    if budget:
        # the budget as given and in the unit of the figures above (GiB): 80GB is 74.5 GiB
        table.add_row(f"≤ {report['budget']} ({_size(budget)})",
                      *(Text("fits", "green") if h["fits"] else Text("no", "red") for h in heads.values()))
    for kind, title in (("head_forward_backward", "measured head"), ("training_step", "measured step")):
        if any(kind in h.get("measured", {}) for h in heads.values()):
            table.add_row(title, *(_measured_cell(h["measured"].get(kind, {})) for h in heads.values()))
    console.print(table)
    for note in report["notes"]:
        console.print(f"  {note}")
    if report.get("runtime_on_cpu_bytes"):
        console.print(f"  on this CPU: a rank's resident set, as `llmtrain run` here reports its peak: the total with "
                      f"only the written part of the ZeRO buffers, plus {_size(report['runtime_on_cpu_bytes'])} of "
                      "libraries and kernels (measured in a fresh process after one small training step)")
    counts = [f"{name} {h['parameter_count']['total'] / 1e6:,.1f}M ({h['parameter_count']['head'] / 1e6:,.1f}M in the head)"
              for name, h in heads.items() if "parameter_count" in h]
    if counts:
        console.print("  parameters: " + ", ".join(counts))
    if report["target"]["world_size"]:
        console.print("  total = params + optimizer + ZeRO buffers + max(working, grads), working = activations + "
                      "ZeRO-3 gathered + max(head total, head weight grads + recomputed layer + layer backward): "
                      "the head's transient memory is freed before the body's backward, the body's activations "
                      "as its gradients appear")
    for name, h in heads.items():
        if "deepspeed_estimator_model_states" in h:
            ours = sum(h["estimate"][k] for k in ("parameters", "gradients", "optimizer_states", "zero3_gathered"))
            console.print(f"  DeepSpeed's own estimator ({name}), model states only: "
                          f"{_size(h['deepspeed_estimator_model_states'])} per rank; ours: {_size(ours)}")
            break
    methods = {m.get("method") for h in heads.values() for m in h.get("measured", {}).values() if "method" in m}
    if "cpu-live-tensors" in methods:
        console.print("  measured on CPU in a fresh process: peak live tensor bytes (MemTracker, as a GPU allocator "
                      "counts them); the resident-set peak (VmHWM) is in the JSON as peak_rss_bytes")
    elif methods:
        console.print("  measured on CUDA in a fresh process: torch.cuda.max_memory_allocated growth")
    if methods:
        console.print("  (%): measured head vs head total; measured step (one process, ZeRO-0, world size 1, "
                      "AdamW; bf16 with fp32 master weights) vs the estimate for that")
    if "reference" in report:
        _render_reference(console, report)
    if budget:
        _render_verdict(console, report)


def _measured_cell(m: dict) -> str | Text:
    if "bytes" in m:
        ratio = m["bytes"] / max(1, m["compare_with"]["bytes"]) - 1
        return f"{_size(m['bytes'])} ({ratio:+.1%})"
    return Text(("skipped: too big here" if "skipped" in m else m.get("error", "—"))[:40], "dim")


def _render_reference(console: Console, report: dict) -> None:
    cap = report["heads"].get("softmax", {}).get("spec", {}).get("softcap")
    title = "Beside the CCE paper's Table 1 (A100, bf16; loss + gradient)" + (
        f"; ours with the model's final-logit softcap {cap:g} (one more fp32 tokens × vocab buffer in softmax)"
        if cap else "")
    table = Table(title=title, title_justify="left")
    for col in ("", "paper", "ours (head total)", "ratio"):
        table.add_column(col, justify="right" if col else "left")
    t = report["target"]
    b = 2 if t["precision"] == "bf16" else 4
    lower_bound = (t["vocab"] + t["tokens"]) * t["hidden"] * b  # ∇W + ∇h at this shape
    for key, ref in report["reference"].items():
        if not isinstance(ref, dict):
            continue
        ours = lower_bound if key == "lower bound" else report["heads"].get(key, {}).get("estimate", {}).get("head_total")
        table.add_row(f"{key}: {ref['what']}", f"{ref['bytes'] / 2**20:,.0f} MiB",
                      f"{ours / 2**20:,.0f} MiB" if ours else "—", f"{ours / ref['bytes']:.2f}×" if ours else "")
    console.print(table)


def _render_verdict(console: Console, report: dict) -> None:
    target = report["target"]
    where = (f"{target['world_size']} × {report['budget']} with ZeRO-{target['zero_stage']}"
             if target["world_size"] else report["budget"])
    fitting = [n for n, h in report["heads"].items() if h["fits"]]
    console.print(Text.assemble((f"Fits on {where}:", "bold"), " ", (", ".join(fitting), "") if fitting else ("no head", "red")))
    for name, h in report["heads"].items():
        if not h["fits"]:
            options = " · ".join(f"{f['change']} ({_size(f['total'])})" for f in h["fixes"])
            console.print(f"  {name} needs {_size(h['estimate']['total'])}; "
                          + (f"fits with: {options}" if options else "no single change found that makes it fit"))


def write_plot(path: Path, target: Target, specs: dict[str, dict] | list[str], budget: int | None) -> None:
    """Head memory (head total) against vocabulary size, at the target's tokens and hidden size;
    `specs` {label: head spec}, or head names at the target's settings."""
    if not isinstance(specs, dict):
        specs = {name: _spec_for(target, name) for name in specs}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmtrain.profile.estimate import estimate_head

    vocabs = sorted(set(PLOT_VOCABS) | {target.vocab})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, spec in specs.items():
        ax.plot(vocabs, [estimate_head(spec, target.tokens, target.hidden, v, target.precision).head_total / 2**30
                         for v in vocabs], marker="o", markersize=3, label=name)
    if budget:
        ax.axhline(budget / 2**30, color="crimson", linestyle="--", label=f"budget {_size(budget)}")
    ax.axvline(target.vocab, color="grey", linestyle=":", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="vocabulary size", ylabel="head forward + backward (GiB)",
           title=f"{target.tokens} tokens × hidden {target.hidden}, {target.precision}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
