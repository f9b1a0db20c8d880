"""The `llmtrain` command: thin; it parses, validates and calls into the modules."""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from llmtrain.errors import UserError

app = typer.Typer(
    help="Train large-vocabulary decoder-only LMs under DeepSpeed ZeRO with a swappable output head.\n\n"
    "Examples:\n\n"
    "  llmtrain run recipes/tiny.yaml\n\n"
    "  llmtrain run recipes/hf-tiny-qwen2.yaml\n\n"
    "  llmtrain run recipes/continue-pretraining.yaml model.hf=/models/Qwen2.5-0.5B head.type=cce\n\n"
    "  llmtrain run recipes/tiny.yaml train.steps=200 deepspeed.zero_stage=3 --out runs/z3\n\n"
    "  llmtrain run recipes/tiny.yaml --out runs/z3 --resume auto\n\n"
    "  llmtrain recipe check recipes/tiny.yaml head.type=cce\n\n"
    "  llmtrain run recipes/tiny.yaml --hostfile hosts --launcher pdsh\n\n"
    "  llmtrain launch slurm recipes/tiny.yaml --nodes 4 --gpus-per-node 8 --time 4:00:00 --dry-run\n\n"
    "  llmtrain export runs/tiny --out exported/tiny\n\n"
    "  llmtrain generate runs/tiny --prompt 'def main(' --max-new-tokens 40",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
checkpoint_app = typer.Typer(help="Work with checkpoints.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")
launch_app = typer.Typer(help="Cluster launch material (see launch/README.md).", no_args_is_help=True)
app.add_typer(launch_app, name="launch")
err = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="dotted key=value overrides, e.g. train.steps=200 head.type=cce", show_default=False)


def user_errors(fn):
    """Errors a user can cause: one short message, no traceback, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)  # paths stay whole
            raise typer.Exit(UserError.exit_code) from None

    return wrapper


@app.command()
@user_errors
def run(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML file"),
    overrides: Optional[List[str]] = OVERRIDES,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder [default: runs/<name>-<time>]"),
    resume: Optional[str] = typer.Option(None, help="'auto' (newest intact checkpoint in --out, if any) or a checkpoint/run folder"),
    stop_after: Optional[int] = typer.Option(None, min=1, help="run this many steps of the schedule, save and exit"),
    hostfile: Optional[Path] = typer.Option(None, help="multi-node: DeepSpeed hostfile ('HOST slots=N' per line); "
                                            "sets launch.nodes and launch.ranks_per_node"),
    launcher: Optional[str] = typer.Option(None, help="with --hostfile: DeepSpeed's multi-node launcher, one of "
                                           "pdsh (default), openmpi, mpich, impi, mvapich, slurm"),
    deepspeed_args: str = typer.Option("", help="with --hostfile: more options for DeepSpeed's launcher, quoted, "
                                       "e.g. '--include node1 --ssh_port 2222'"),
    prepare_only: bool = typer.Option(False, help="prepare data, the run folder and (on a new world size) the universal "
                                      "checkpoint, then exit; launch/slurm.sbatch runs this before srun"),
    allow_data_change: bool = typer.Option(False, help="resume on a corpus other than the checkpoint's (same tokenizer)"),
    force: bool = typer.Option(False, help="launch even when the estimated memory per rank exceeds the device's"),
):
    """Train: prepare data, launch one worker per rank, checkpoint, evaluate.

    Stop any time with Ctrl-C, SIGTERM or SIGUSR1: the step finishes, a checkpoint is saved, and
    the run continues with --resume auto, on the same or another number of ranks (another world
    size goes through a DeepSpeed universal checkpoint, converted automatically). A second Ctrl-C
    or SIGTERM ends every rank at once, keeping the last complete checkpoint.

    Exit codes: 0 complete or stopped and saved; 1 failed; 2 bad input (nothing started);
    3 diverged (non-finite loss, gradients or weights); 124 a rank stopped responding for
    launch.timeout_s; 128+N ended by a second signal N. status.yaml in the run folder says the same.
    """
    from llmtrain.launch.lock import LOCK_NAME, RunLock
    from llmtrain.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    launcher_cmd_args = _multinode_options(recipe, hostfile, launcher, deepspeed_args)
    out = out or Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume is None and out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise UserError(f"--out {out}: the folder holds an earlier run; continue it with --resume auto, "
                        "or choose another --out (nothing was changed)")
    with RunLock(out) as lock:
        code = _run_locked(recipe, out, lock, resume=resume, stop_after=stop_after, hostfile=hostfile,
                           launcher_cmd_args=launcher_cmd_args, prepare_only=prepare_only,
                           allow_data_change=allow_data_change, force=force)
        if code > 128:  # a second signal: leave now, without the interpreter's slow teardown of torch
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    raise typer.Exit(code)


def _run_locked(recipe, out: Path, lock, *, resume, stop_after, hostfile, launcher_cmd_args, prepare_only,
                allow_data_change, force) -> int:
    """Everything `run` does while it holds the run folder's lock; returns the exit code."""
    from llmtrain.data.prepare import prepare_data
    from llmtrain.launch.local import hostfile_command, local_command, run_launcher, worker_args
    from llmtrain.train.checkpoint import RESUME_FROM, check_compatible, read_meta, remove_partial, resolve_resume
    from llmtrain.train.heartbeat import clear_heartbeats
    from llmtrain.train.metrics import truncate_after
    from llmtrain.train.status import write_status
    from llmtrain.train.universal import checkpoint_to_load

    warn = lambda text: err.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    checkpoint = resolve_resume(resume, out, warn=warn)
    prep = prepare_data(recipe.data, recipe.tokenizer, recipe.model.seq_len, log=err.print)
    if recipe.model.hf:
        from llmtrain.model.hf import check_before_launch

        check_before_launch(recipe.model.hf, prep.vocab_size, weights=checkpoint is None)
    if not force:
        _check_memory(recipe, prep.vocab_size)
    if checkpoint is None and recipe.temperature.enabled and recipe.temperature.mode == "frozen_body":
        from llmtrain.train.init_from import resolve_init_from

        recipe.temperature.init_from = str(resolve_init_from(recipe, prep.tokenizer_hash))
    if checkpoint is not None:
        meta = read_meta(checkpoint)
        check_compatible(meta, recipe.identity(), prep.tokenizer_hash, checkpoint, corpus_hash=prep.corpus_hash,
                         corpus=recipe.data.source, allow_data_change=allow_data_change)
        _note_batch_change(meta, recipe)
        truncate_after(out / "metrics.jsonl", meta["step"])
        checkpoint = checkpoint_to_load(checkpoint, recipe.world_size, recipe.deepspeed.zero_stage,
                                        may_convert=True, log=err.print)
        err.print(f"resuming from {checkpoint} (step {meta['step']}, saved by {meta['world_size']} ranks)")
    for partial in remove_partial(out / "checkpoints"):
        warn(f"removed {partial}: a save that never finished (no llmtrain.json)")
    (out / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    (out / "data.json").write_text(prep.to_json())
    if prepare_only:
        # srun's ranks resolve --resume auto themselves: point them at the checkpoint verified here.
        (out / RESUME_FROM).unlink(missing_ok=True)
        if checkpoint is not None:
            (out / RESUME_FROM).write_text(f"{checkpoint}\n")
        err.print(f"prepared {out} for {recipe.world_size} ranks")
        return 0
    args = worker_args(out, checkpoint, stop_after, allow_data_change)
    cmd = hostfile_command(recipe, hostfile, *launcher_cmd_args, args) if hostfile else local_command(recipe, args)
    clear_heartbeats(out)
    write_status(out, "running", step=None, steps=recipe.train.steps, started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 pid=os.getpid(), resumed_from=str(checkpoint) if checkpoint else None)
    outcome = run_launcher(cmd, recipe.launch.ranks_per_node, run_dir=out, world_size=recipe.world_size,
                           timeout_s=recipe.launch.timeout_s, keep_fds=(lock.fd,))
    return _conclude(out, outcome)


def _conclude(out: Path, outcome) -> int:
    """The exit code of a launched run, with status.yaml made to say the same."""
    import signal

    from llmtrain.train.checkpoint import complete_checkpoints, remove_partial
    from llmtrain.train.status import EXIT_DIVERGED, EXIT_FAILED, EXIT_HUNG, read_status, write_status

    status = read_status(out)
    state = status.get("state")
    if outcome.code == 0 and outcome.hung is None and outcome.interrupted is None and state in ("complete", "stopped"):
        return 0
    for partial in remove_partial(out / "checkpoints"):
        err.print(f"removed {partial}: a save that did not finish", highlight=False, soft_wrap=True)
    kept = complete_checkpoints(out / "checkpoints")
    last = str(kept[-1]) if kept else None
    if outcome.interrupted is not None:
        name = signal.Signals(outcome.interrupted).name
        code, new_state, reason = 128 + outcome.interrupted, "interrupted", f"a second {name}: every rank was ended at once"
    elif outcome.hung is not None:
        code, new_state, reason = EXIT_HUNG, "hung", f"the job stopped making progress: {outcome.hung}; every rank was ended"
    elif state == "diverged":
        err.print(f"[bold red]diverged[/]: {status.get('reason')}", highlight=False, soft_wrap=True)
        return EXIT_DIVERGED
    elif outcome.code == 2 and state == "running":
        return 2  # the ranks refused the input; they printed why
    elif state == "failed":
        code, new_state, reason = EXIT_FAILED, "failed", status.get("reason")
    else:
        culprit = f"; {outcome.culprit}" if outcome.culprit else ""
        code, new_state, reason = EXIT_FAILED, "failed", f"the ranks failed (launcher exit code {outcome.code}){culprit}"
    write_status(out, new_state, reason=reason, step=status.get("step"), steps=status.get("steps"), checkpoint=last,
                 exit_code=code)
    err.print(f"[bold red]training {new_state}[/]: {reason}. Last complete checkpoint: {last or 'none'}. "
              f"Run folder: {out}", highlight=False, soft_wrap=True)
    return code


def _check_memory(recipe, vocab_size: int) -> None:
    """Refuse a recipe whose estimated memory per rank (llmtrain profile's model) exceeds the
    device's total memory, naming what would fit; --force skips this."""
    from llmtrain.train.memory import format_bytes

    try:
        from llmtrain.profile.estimate import estimate_recipe, fixes_for_recipe

        need = estimate_recipe(recipe, vocab_size).total
    except Exception as e:  # noqa: BLE001  (an estimate that fails must not block training)
        err.print(f"note: no memory estimate for this recipe ({e}); launching without the check")
        return
    have, where = _device_memory(recipe.launch.ranks_per_node)
    if need <= have:
        return
    fixes = fixes_for_recipe(recipe, vocab_size, recipe.world_size, have)
    fit = "; ".join(f"{f.change} ({format_bytes(f.total)})" for f in fixes) or "nothing found among the usual changes"
    raise UserError(f"the estimated memory per rank is {format_bytes(need)} (llmtrain profile's model), more than "
                    f"{where} ({format_bytes(have)}). What would fit: {fit}. Check with `llmtrain profile RECIPE`, or "
                    "pass --force to launch anyway")


def _device_memory(ranks_per_node: int) -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "the GPU's total memory"
    import psutil

    return psutil.virtual_memory().total // ranks_per_node, f"this machine's RAM shared by {ranks_per_node} ranks"


def _multinode_options(recipe, hostfile: Path | None, launcher: str | None, deepspeed_args: str):
    """Check --hostfile/--launcher/--deepspeed-args; the hostfile sets the recipe's node layout."""
    import shlex

    from llmtrain.launch.hostfile import read_hostfile
    from llmtrain.launch.local import MULTINODE_LAUNCHERS

    if hostfile is None:
        if launcher or deepspeed_args:
            raise UserError("--launcher and --deepspeed-args need --hostfile (one line 'HOST slots=N' per node)")
        return None
    launcher = launcher or "pdsh"
    if launcher not in MULTINODE_LAUNCHERS:
        raise UserError(f"--launcher {launcher!r}: choose one of {', '.join(MULTINODE_LAUNCHERS)}")
    if recipe.launch.launcher != "deepspeed":
        raise UserError("--hostfile: multi-node runs go through DeepSpeed's launcher; set launch.launcher=deepspeed")
    hosts = read_hostfile(hostfile)
    slots = {h.slots for h in hosts}
    if len(slots) > 1:
        raise UserError(f"--hostfile {hostfile}: every host needs the same slots (ranks per node); found "
                        + ", ".join(f"{h.name}={h.slots}" for h in hosts))
    recipe.launch.nodes, recipe.launch.ranks_per_node = len(hosts), slots.pop()
    try:
        extra = shlex.split(deepspeed_args)
    except ValueError as e:
        raise UserError(f"--deepspeed-args: {e}") from None
    return launcher, extra


def _note_batch_change(meta: dict, recipe) -> None:
    """The data position is global, so another world size continues at the same place; the
    trajectory matches only if the global batch is kept."""
    saved = meta["recipe"]["train"]
    before = saved["micro_batch"] * saved["grad_accum"] * meta["world_size"]
    now = recipe.train.micro_batch * recipe.train.grad_accum * recipe.world_size
    if before != now:
        err.print(f"[yellow]note[/]: the global batch changes from {before} to {now} sequences per step "
                  "(train.micro_batch × train.grad_accum × ranks); training continues at the same data "
                  "position, but not on the same trajectory")


@checkpoint_app.command("universal")
@user_errors
def checkpoint_universal(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="run folder, its checkpoints/ folder, or one checkpoint"),
):
    """Convert a checkpoint to a DeepSpeed universal one, loadable on any number of ranks.

    Takes the newest complete checkpoint of RUN_DIR (`llmtrain run --resume` does this itself when
    it sees another world size) and writes checkpoints/universal/stepNNNNNNNN/ beside it; the
    original is kept."""
    from llmtrain.export import find_checkpoint
    from llmtrain.train.universal import convert

    tag_dir = find_checkpoint(run_dir)
    out = convert(tag_dir, log=err.print)
    print(out)


@checkpoint_app.command("verify")
@user_errors
def checkpoint_verify(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="run folder, its checkpoints/ folder, or one checkpoint"),
):
    """Check every checkpoint of RUN_DIR against its manifest (each file's size and SHA-256).

    One line per checkpoint: ok, unverified (saved before manifests existed) or BAD with the file
    at fault. Exit 0 when none is bad, 1 otherwise. `--resume auto` skips bad ones by itself."""
    from llmtrain.train.checkpoint import META, has_manifest, tag_dirs, verify

    if (run_dir / META).is_file():
        found = [run_dir]
    else:
        found = tag_dirs(run_dir / "checkpoints") or tag_dirs(run_dir)
        found += tag_dirs(run_dir / "checkpoints" / "universal")
    if not found:
        raise UserError(f"{run_dir}: no checkpoints there; pass a run folder, its checkpoints/ folder or one checkpoint")
    bad = 0
    for tag_dir in found:
        problem = verify(tag_dir)
        if problem:
            bad += 1
            print(f"BAD         {tag_dir}: {problem}")
        elif not has_manifest(tag_dir):
            print(f"unverified  {tag_dir} (saved without a manifest by an older llmtrain)")
        else:
            print(f"ok          {tag_dir}")
    if bad:
        err.print(f"[bold red]{bad} of {len(found)} checkpoints failed verification[/]")
        raise typer.Exit(1)


@launch_app.command("slurm")
@user_errors
def launch_slurm(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML file"),
    overrides: Optional[List[str]] = OVERRIDES,
    nodes: int = typer.Option(..., min=1, help="nodes to allocate"),
    gpus_per_node: int = typer.Option(..., min=1, help="GPUs per node: one srun task (rank) each"),
    partition: Optional[str] = typer.Option(None, help="SLURM partition"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="SLURM time limit, e.g. 4:00:00"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder the job trains into [default: runs/<name>]"),
    script: Optional[Path] = typer.Option(None, help="where to write the script [default: <run folder>.sbatch]"),
    cpus_per_task: Optional[int] = typer.Option(None, min=1, help="CPU cores per rank (also OMP_NUM_THREADS)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the script; write and submit nothing"),
    submit: bool = typer.Option(False, "--submit", help="write the script and submit it with sbatch"),
):
    """Write the sbatch script for a recipe: one srun task per GPU, preemption-safe.

    The job trains RECIPE on NODES × GPUS-PER-NODE ranks, saves on USR1 (before the time limit) or
    TERM (preemption, scancel), requeues itself and resumes. See launch/README.md."""
    import shutil
    import subprocess

    from llmtrain.recipe import load_recipe
    from llmtrain.launch.slurm_script import render

    if dry_run and submit:
        raise UserError("--dry-run and --submit: choose one")
    layout = [f"launch.nodes={nodes}", f"launch.ranks_per_node={gpus_per_node}"]
    recipe = load_recipe(recipe_path, [*(overrides or []), *layout])  # every recipe problem now, not in the queue
    out = out or Path("runs") / recipe.name
    text = render(recipe=recipe_path, overrides=list(overrides or []), run_dir=out, nodes=nodes,
                  gpus_per_node=gpus_per_node, job_name=recipe.name, python=sys.executable, partition=partition,
                  time_limit=time_limit, cpus_per_task=cpus_per_task)
    if dry_run:
        sys.stdout.write(text)
        return
    script = script or out.parent / f"{out.name}.sbatch"
    if script.exists():
        raise UserError(f"--script {script}: the file exists; remove it or pass another --script (nothing was written)")
    if submit and not shutil.which("sbatch"):
        raise UserError("--submit: sbatch is not on PATH; run this on a SLURM login node, or write the script and copy it there")
    script.parent.mkdir(parents=True, exist_ok=True)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)  # SLURM opens the job's log there at start
    script.write_text(text)
    script.chmod(0o755)
    err.print(f"wrote {script}")
    if submit:
        proc = subprocess.run(["sbatch", str(script)], text=True, capture_output=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            raise UserError(f"sbatch {script} failed: {proc.stderr.strip()}")


@app.command()
@user_errors
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="run folder (or one of its checkpoints)"),
    out: Path = typer.Option(..., "--out", "-o", help="new folder for the export (must not exist or be empty)"),
):
    """Export a run's weights (safetensors), tokenizer and recipe; a Hugging Face folder too.

    Consolidates the newest complete checkpoint (DeepSpeed's zero_to_fp32, fp32 weights) into
    model.safetensors with tokenizer.json and the resolved recipe; for the softmax and cce heads
    also hf/, which transformers' AutoModelForCausalLM loads with the same logits: Llama for our
    own body, the original architecture (config, weights, tokenizer files) for a model.hf run."""
    from llmtrain.export import export_run

    written = export_run(run_dir, out, log=err.print)
    err.print(f"[green]exported[/] {', '.join(written)} to {out}")


@app.command()
@user_errors
def generate(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="run folder (or one of its checkpoints)"),
    prompt: str = typer.Option(..., help="text to continue"),
    checkpoint: Optional[Path] = typer.Option(None, help="a checkpoint folder [default: the newest complete one]"),
    max_new_tokens: int = typer.Option(64, min=1, help="tokens to generate"),
    temperature: str = typer.Option("1.0", help="sampling temperature (0 = greedy), or 'auto' for a head with a temperature network"),
    top_k: Optional[int] = typer.Option(None, min=1, help="sample among the k best tokens only"),
    seed: int = typer.Option(0, help="seed of the sampler"),
):
    """Continue PROMPT with the run's model, sampling through its head."""
    from llmtrain.generate import generate_text, parse_temperature

    text = generate_text(checkpoint or run_dir, prompt, max_new_tokens=max_new_tokens,
                         temperature=parse_temperature(temperature), top_k=top_k, seed=seed)
    sys.stdout.write(text + "\n")


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


from llmtrain.profile.report import profile as profile_command  # noqa: E402  (imports no torch)

app.command("profile")(user_errors(profile_command))
from llmtrain.bench import app as bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


def main():
    app()


if __name__ == "__main__":
    main()
