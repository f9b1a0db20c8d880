"""The `llmtrain` command: thin; it parses, validates and calls into the modules."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
import yaml
from rich.console import Console

from llmtrain.errors import UserError

app = typer.Typer(
    help="Train large-vocabulary decoder-only LMs under DeepSpeed ZeRO with a swappable output head.\n\n"
    "Examples:\n\n"
    "  llmtrain run recipes/tiny.yaml\n\n"
    "  llmtrain run recipes/tiny.yaml train.steps=200 deepspeed.zero_stage=3 --out runs/z3\n\n"
    "  llmtrain run recipes/tiny.yaml --out runs/z3 --resume auto\n\n"
    "  llmtrain recipe check recipes/tiny.yaml head.type=cce",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
err = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="dotted key=value overrides, e.g. train.steps=200 head.type=cce", show_default=False)


def user_errors(fn):
    """Errors a user can cause: one short message, no traceback, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(UserError.exit_code) from None

    return wrapper


@app.command()
@user_errors
def run(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML file"),
    overrides: Optional[List[str]] = OVERRIDES,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder [default: runs/<name>-<time>]"),
    resume: Optional[str] = typer.Option(None, help="'auto' (newest complete checkpoint in --out, if any) or a checkpoint/run folder"),
    stop_after: Optional[int] = typer.Option(None, min=1, help="run this many steps of the schedule, save and exit"),
):
    """Train: prepare data, launch one worker per rank, checkpoint, evaluate.

    Stop any time with Ctrl-C or SIGTERM: the step finishes, a checkpoint is saved, and the run
    continues with --resume auto.
    """
    from llmtrain.checkpoint import check_compatible, read_meta, resolve_resume
    from llmtrain.data import prepare_data
    from llmtrain.launch import local_command, run_launcher, worker_args
    from llmtrain.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    out = out or Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoint = resolve_resume(resume, out)
    if resume is None and out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder holds an earlier run; continue it with --resume auto, "
                        "or choose another --out (nothing was changed)")
    prep = prepare_data(recipe.data, recipe.tokenizer, recipe.model.seq_len, log=err.print)
    if checkpoint is None and recipe.temperature.enabled and recipe.temperature.mode == "frozen_body":
        from llmtrain.init_from import resolve_init_from

        recipe.temperature.init_from = str(resolve_init_from(recipe, prep.tokenizer_hash))
    if checkpoint is not None:
        meta = read_meta(checkpoint)
        check_compatible(meta, recipe.identity(), prep.tokenizer_hash, checkpoint)
        if meta["world_size"] != recipe.world_size:
            raise UserError(f"--resume {checkpoint}: saved with {meta['world_size']} ranks, this run has "
                            f"{recipe.world_size} (launch.ranks_per_node × launch.nodes); resume on the same world size")
        err.print(f"resuming from {checkpoint} (step {meta['step']})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    (out / "data.json").write_text(prep.to_json())
    cmd = local_command(recipe, worker_args(out, checkpoint, stop_after))
    code = run_launcher(cmd, recipe.launch.ranks_per_node)
    status_file = out / "status.yaml"
    if code != 0 and not status_file.exists():
        err.print(f"[bold red]training failed[/] (launcher exit code {code}); see the output above. Run folder: {out}")
        raise typer.Exit(1)
    raise typer.Exit(0)


@recipe_app.command("check")
@user_errors
def recipe_check(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML file"),
    overrides: Optional[List[str]] = OVERRIDES,
):
    """Validate a recipe (all problems at once) and print it resolved, with defaults and overrides."""
    from llmtrain.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    sys.stdout.write(recipe.to_yaml())
    err.print(f"[green]ok[/]: {recipe_path} is valid ({recipe.world_size} ranks, head {recipe.head.type})")


from llmtrain.profile import profile as profile_command  # noqa: E402  (imports no torch)

app.command("profile")(user_errors(profile_command))
from llmtrain.bench import app as bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


def main():
    app()


if __name__ == "__main__":
    main()
