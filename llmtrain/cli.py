"""The `llmtrain` command: thin; it parses, validates and calls into the modules.

Help and messages are plain text (Typer's rich markup is off): a path or value holding brackets is
printed as it is, and hand-written `[default: ...]` notes stay in the help.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Literal, Optional

import typer
from rich.console import Console
from rich.text import Text

from llmtrain import __version__
from llmtrain.errors import UserError, problems_error, user_errors

# launch.local.MULTINODE_LAUNCHERS (a test keeps them equal): importing it would import torch for --help
MULTINODE_LAUNCHERS = ("pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm")
PLAIN = {"rich_markup_mode": None, "context_settings": {"help_option_names": ["-h", "--help"]}}
app = typer.Typer(
    help="Train large-vocabulary decoder-only LMs under DeepSpeed ZeRO with a swappable output head.\n\n"
    "Examples (they work pasted in this order, from the repository or any folder):\n\n"
    "\b\n"
    "  llmtrain recipe list\n"
    "  llmtrain recipe copy tiny my-tiny.yaml\n"
    "  llmtrain recipe keys head\n"
    "  llmtrain recipe check my-tiny.yaml head.type=cce\n"
    "  llmtrain profile my-tiny.yaml --budget 8GB --no-measure\n"
    "  llmtrain run my-tiny.yaml train.steps=12 --out runs/tiny\n"
    "  llmtrain run my-tiny.yaml train.steps=14 --out runs/tiny --resume auto\n"
    "  llmtrain export runs/tiny --out exported/tiny\n"
    "  llmtrain generate runs/tiny --prompt 'def main(' --max-new-tokens 8 --top-p 0.9\n"
    "  llmtrain launch slurm my-tiny.yaml --nodes 4 --gpus-per-node 8 --time 4:00:00 --account myproject --dry-run\n\n"
    "Every command has its own --help with more examples. Exit codes: 0 done, 1 training failed, "
    "2 a mistake in the command line, recipe or files (nothing started).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    **PLAIN,
)
recipe_app = typer.Typer(help="List, copy, document and check recipes.", no_args_is_help=True, **PLAIN)
app.add_typer(recipe_app, name="recipe")
checkpoint_app = typer.Typer(help="Work with checkpoints.", no_args_is_help=True, **PLAIN)
app.add_typer(checkpoint_app, name="checkpoint")
launch_app = typer.Typer(help="Cluster launch material (see launch/README.md).", no_args_is_help=True, **PLAIN)
app.add_typer(launch_app, name="launch")
# Plain text: messages carry paths and values, which rich would read as markup ("[/]" crashes it).
err = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)

OVERRIDES = typer.Argument(None, help="dotted key=value overrides, e.g. train.steps=200 head.type=cce "
                           "(`llmtrain recipe keys` lists every key)", show_default=False, metavar="[KEY=VALUE]...")


def _print_version(value: bool) -> None:
    if value:
        print(f"llmtrain {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the version and exit"),
):
    pass


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
    launcher: Optional[Literal[MULTINODE_LAUNCHERS]] = typer.Option(
        None, help="with --hostfile: DeepSpeed's multi-node launcher [default: pdsh]", show_default=False),
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
    or SIGTERM ends every rank at once, keeping the last complete checkpoint. Multi-node:
    --hostfile hosts --launcher pdsh (see launch/README.md).

    Exit codes: 0 complete or stopped and saved; 1 failed; 2 bad input (nothing started);
    3 diverged (non-finite loss, gradients or weights); 124 a rank stopped responding for
    launch.timeout_s; 128+N ended by a second signal N, or by a signal N before the ranks were ready
    (nothing to save: run the same command again). status.yaml in the run folder says the same.

    Examples (after `llmtrain recipe copy tiny my-tiny.yaml`):

    \b
      llmtrain run my-tiny.yaml train.steps=12 --out runs/tiny
      llmtrain run my-tiny.yaml train.steps=14 --out runs/tiny --resume auto
      llmtrain run my-tiny.yaml head.type=cce deepspeed.zero_stage=3 --out runs/tiny-z3 --stop-after 2
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
        if code > 128:  # ended by a signal: leave now, without the interpreter's slow teardown of torch
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    raise typer.Exit(code)


def _run_locked(recipe, out: Path, lock, *, resume, stop_after, hostfile, launcher_cmd_args, prepare_only,
                allow_data_change, force) -> int:
    """Everything `run` does while it holds the run folder's lock; returns the exit code."""
    from llmtrain.launch.local import run_launcher
    from llmtrain.launch.stop import Interrupted, stop_before_launch
    from llmtrain.train.status import read_status, write_status

    try:
        with stop_before_launch():
            cmd = _prepare_run(recipe, out, resume=resume, stop_after=stop_after, hostfile=hostfile,
                               launcher_cmd_args=launcher_cmd_args, prepare_only=prepare_only,
                               allow_data_change=allow_data_change, force=force)
            if cmd is None:
                return 0
            # inside: the launcher's own signal handling replaces ours before it starts anything
            outcome = run_launcher(cmd, recipe.launch.ranks_per_node, run_dir=out, world_size=recipe.world_size,
                                   timeout_s=recipe.launch.timeout_s, keep_fds=(lock.fd,))
    except Interrupted as stop:
        reason = f"{stop} before the ranks started: nothing was trained or saved; continue with --resume auto"
        if read_status(out).get("pid") == os.getpid():  # this attempt had said "running"
            write_status(out, "interrupted", reason=reason, exit_code=128 + stop.signum)
        err.print(f"stopped by {reason} (a data preparation continues where it stopped)")
        return 128 + stop.signum
    return _conclude(out, outcome)


def _prepare_run(recipe, out: Path, *, resume, stop_after, hostfile, launcher_cmd_args, prepare_only,
                 allow_data_change, force) -> list[str] | None:
    """Data, checks, the checkpoint to resume and the run folder; the launcher command (None with
    --prepare-only)."""
    from llmtrain.data.prepare import prepare_data
    from llmtrain.launch.local import hostfile_command, local_command, worker_args
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
        return None
    args = worker_args(out, checkpoint, stop_after, allow_data_change)
    cmd = hostfile_command(recipe, hostfile, *launcher_cmd_args, args) if hostfile else local_command(recipe, args)
    clear_heartbeats(out)
    write_status(out, "running", step=None, steps=recipe.train.steps, started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 pid=os.getpid(), resumed_from=str(checkpoint) if checkpoint else None)
    return cmd


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
    if outcome.interrupted is not None and outcome.before_ranks:
        name = signal.Signals(outcome.interrupted).name
        code, new_state, reason = (128 + outcome.interrupted, "interrupted",
                                   f"{name} while the ranks were starting: nothing was trained; continue with --resume auto")
    elif outcome.interrupted is not None:
        name = signal.Signals(outcome.interrupted).name
        code, new_state, reason = 128 + outcome.interrupted, "interrupted", f"a second {name}: every rank was ended at once"
    elif outcome.hung is not None:
        code, new_state, reason = EXIT_HUNG, "hung", f"the job stopped making progress: {outcome.hung}; every rank was ended"
    elif state == "diverged":
        err.print(Text.assemble(("diverged", "bold red"), f": {status.get('reason')}"))
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
    err.print(Text.assemble((f"training {new_state}", "bold red"), f": {reason}. Last complete checkpoint: "
                            f"{last or 'none'}. Run folder: {out}"))
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
        err.print(f"note: the global batch changes from {before} to {now} sequences per step "
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
    original is kept.

    Example (after `llmtrain run my-tiny.yaml train.steps=12 --out runs/tiny`):

    \b
      llmtrain checkpoint universal runs/tiny
    """
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
    at fault. Exit 0 when none is bad, 1 otherwise. `--resume auto` skips bad ones by itself.

    Example (after `llmtrain run my-tiny.yaml train.steps=12 --out runs/tiny`):

    \b
      llmtrain checkpoint verify runs/tiny
    """
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
        err.print(Text(f"{bad} of {len(found)} checkpoints failed verification", "bold red"))
        raise typer.Exit(1)


@launch_app.command("slurm")
@user_errors
def launch_slurm(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML file"),
    overrides: Optional[List[str]] = OVERRIDES,
    nodes: Optional[int] = typer.Option(None, min=1, help="nodes to allocate [default: the recipe's launch.nodes]",
                                        show_default=False),
    gpus_per_node: Optional[int] = typer.Option(None, min=1, help="GPUs per node, one srun task (rank) each "
                                                "[default: the recipe's launch.ranks_per_node]", show_default=False),
    partition: Optional[str] = typer.Option(None, help="SLURM partition"),
    account: Optional[str] = typer.Option(None, help="SLURM account to charge (sbatch --account)"),
    qos: Optional[str] = typer.Option(None, help="SLURM quality of service (sbatch --qos)"),
    constraint: Optional[str] = typer.Option(None, help="node features, e.g. 'a100&ib' (sbatch --constraint)"),
    sbatch_line: Optional[List[str]] = typer.Option(None, "--sbatch-line", help="one more #SBATCH option, e.g. "
                                                    "--sbatch-line=--mail-type=END (repeatable)", show_default=False),
    time_limit: Optional[str] = typer.Option(None, "--time", help="SLURM time limit, e.g. 4:00:00"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder the job trains into [default: runs/<name>]",
                                       show_default=False),
    script: Optional[Path] = typer.Option(None, help="where to write the script [default: <run folder>.sbatch]",
                                          show_default=False),
    cpus_per_task: Optional[int] = typer.Option(None, min=1, help="CPU cores per rank (also OMP_NUM_THREADS)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the script; write and submit nothing"),
    submit: bool = typer.Option(False, "--submit", help="write the script and submit it with sbatch"),
):
    """Write the sbatch script for a recipe: one srun task per GPU, preemption-safe.

    The job trains RECIPE on NODES × GPUS-PER-NODE ranks, saves on USR1 (before the time limit) or
    TERM (preemption, scancel), requeues itself and resumes. See launch/README.md. --nodes and
    --gpus-per-node default to the recipe's launch.nodes and launch.ranks_per_node; a flag that
    contradicts a value the recipe sets is refused.

    Examples:

    \b
      llmtrain launch slurm my-tiny.yaml --nodes 4 --gpus-per-node 8 --time 4:00:00 --dry-run
      llmtrain launch slurm my-tiny.yaml --nodes 2 --gpus-per-node 8 --qos high --constraint a100 --sbatch-line=--mail-type=END --dry-run
    """
    import shutil
    import subprocess

    from llmtrain.recipe import load_recipe
    from llmtrain.launch.slurm_script import render

    if dry_run and submit:
        raise UserError("--dry-run and --submit: choose one")
    recipe = load_recipe(recipe_path, overrides or [])
    for flag, value, key in (("--nodes", nodes, "nodes"), ("--gpus-per-node", gpus_per_node, "ranks_per_node")):
        set_to = getattr(recipe.launch, key)
        if value is not None and key in recipe.launch.model_fields_set and value != set_to:
            raise UserError(f"{flag} {value} contradicts launch.{key}: {set_to} in {recipe_path} or its overrides; "
                            f"drop {flag}, or pass launch.{key}={value} instead (nothing was written)")
    nodes, gpus_per_node = nodes or recipe.launch.nodes, gpus_per_node or recipe.launch.ranks_per_node
    layout = [f"launch.nodes={nodes}", f"launch.ranks_per_node={gpus_per_node}"]
    recipe = load_recipe(recipe_path, [*(overrides or []), *layout])  # every recipe problem now, not in the queue
    out = out or Path("runs") / recipe.name
    text = render(recipe=recipe_path, overrides=list(overrides or []), run_dir=out, nodes=nodes,
                  gpus_per_node=gpus_per_node, job_name=recipe.name, python=sys.executable, partition=partition,
                  time_limit=time_limit, cpus_per_task=cpus_per_task, account=account, qos=qos,
                  constraint=constraint, extra_lines=list(sbatch_line or []))
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
    own body, the original architecture (config, weights, tokenizer files) for a model.hf run.

    Example (after `llmtrain run my-tiny.yaml train.steps=12 --out runs/tiny`):

    \b
      llmtrain export runs/tiny --out exported/tiny
    """
    from llmtrain.export import export_run

    written = export_run(run_dir, out, log=err.print)
    err.print(f"exported {', '.join(written)} to {out}")


@app.command()
@user_errors
def generate(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="run folder (or one of its checkpoints)"),
    prompt: str = typer.Option(..., help="text to continue"),
    checkpoint: Optional[Path] = typer.Option(None, help="a checkpoint folder [default: the newest complete one]",
                                              show_default=False),
    max_new_tokens: int = typer.Option(64, min=1, max=1_000_000, help="tokens to generate"),
    temperature: str = typer.Option("1.0", help="sampling temperature (0 = greedy), or 'auto' for a head with a temperature network"),
    top_k: Optional[int] = typer.Option(None, min=1, help="sample among the k best tokens only"),
    top_p: Optional[float] = typer.Option(None, min=0.001, max=1.0,
                                          help="sample among the fewest best tokens whose probability reaches p "
                                          "(nucleus sampling), e.g. 0.9"),
    seed: int = typer.Option(0, help="seed of the sampler"),
):
    """Continue PROMPT with the run's model, sampling through its head.

    --top-k and --top-p pick the candidates by the head's probabilities; --temperature then
    re-weights the candidates among themselves.

    Examples (after `llmtrain run my-tiny.yaml train.steps=12 --out runs/tiny`):

    \b
      llmtrain generate runs/tiny --prompt 'def main(' --max-new-tokens 20
      llmtrain generate runs/tiny --prompt 'import os' --max-new-tokens 8 --top-p 0.9 --temperature 0.8
    """
    from llmtrain.generate import generate_text, parse_temperature

    text = generate_text(checkpoint or run_dir, prompt, max_new_tokens=max_new_tokens,
                         temperature=parse_temperature(temperature), top_k=top_k, top_p=top_p, seed=seed)
    sys.stdout.write(text + "\n")


@app.command()
@user_errors
def compare(
    runs: List[Path] = typer.Argument(..., metavar="RUN...", help="run folders (made by `llmtrain run --out`)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="report folder [default: runs/compare-<time>]",
                                       show_default=False),
):
    """Compare runs side by side: a table, PNG plots and index.md tying them.

    The table: head and options, steps, tokens, training seconds, tokens/s, MFU, peak memory per
    rank, final and best validation loss, perplexity, bits per byte (comparable across tokenizers),
    top-1/5/10, and bits per byte and top-1 at equal wall-clock (each run's value at the shortest
    run's training seconds, interpolated between evaluations). Plots: validation bits per byte
    against tokens and against training seconds, top-1 against tokens, training loss against
    steps, tokens/s and MFU. Runs may differ in length, be resumed or still running; the report
    files in --out are replaced, nothing else there is touched.

    Example (after two `llmtrain run` commands):

    \b
      llmtrain compare runs/tiny runs/tiny-z3 --out reports/tiny
    """
    from llmtrain.report.index import compare_runs

    index = compare_runs(list(runs), out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    sys.stdout.write((index.parent / "table.md").read_text())
    err.print(f"wrote {index} (table.md and the plots beside it)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def study(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML file"),
    args: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]... --variant NAME [KEY=VALUE]...", show_default=False,
        help="overrides for every variant, then each variant: --variant, its name (its folder under --out) and "
        "its overrides"),
    out: Path = typer.Option(..., "--out", "-o", help="the study's folder: one run folder per variant, report/, "
                             "study.yaml"),
    equal_time: bool = typer.Option(False, "--equal-time", help="also train each variant after the first for the "
                                    "first one's training seconds (folder NAME-equal-time)"),
):
    """Train variants of a recipe one after another, then compare them (report/index.md).

    Each variant is an ordinary run folder under --out, trained by `llmtrain run` with the
    recipe, the common overrides and its own. Interrupted (Ctrl-C, SIGTERM: the variant in
    progress saves and stops), the same command continues: complete variants are skipped, the
    interrupted one resumes from its checkpoint. --equal-time: each later variant also trains for
    as many steps as fit in the first variant's training seconds at its own speed. Exit codes as
    `llmtrain run`'s, of the variant that ended the study.

    Example (after `llmtrain recipe copy tiny my-tiny.yaml`):

    \b
      llmtrain study my-tiny.yaml train.steps=12 --variant softmax head.type=softmax --variant hsm head.type=hsm --out runs/study
    """
    from llmtrain.report.study import parse_study_args, run_study

    common, variants = parse_study_args(list(args or []))
    raise typer.Exit(run_study(recipe_path, common, variants, out, equal_time, log=err.print))


@recipe_app.command("check")
@user_errors
def recipe_check(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="recipe YAML file"),
    overrides: Optional[List[str]] = OVERRIDES,
):
    """Validate a recipe (all problems at once, paths included) and print it resolved: every
    default written out, the head's options included, overrides applied.

    Examples:

    \b
      llmtrain recipe check my-tiny.yaml
      llmtrain recipe check my-tiny.yaml head.type=cce head.filter_eps=1e-4 train.lr=1e-3
    """
    from llmtrain.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    problems = _missing_paths(recipe)
    if problems:
        raise problems_error(str(recipe_path), problems)
    sys.stdout.write(recipe.to_yaml())
    err.print(f"ok: {recipe_path} is valid ({recipe.world_size} ranks, head {recipe.head.type})")


def _missing_paths(recipe) -> list[str]:
    """The recipe's paths that do not lead to anything: data.source as the data reader finds files,
    tokenizer.path, temperature.init_from (model.hf is checked while the recipe loads)."""
    from llmtrain.data.sources import _local_files  # the reader's own rules: file, folder or glob

    problems = []
    source = recipe.data.source
    if source != "stdlib" and not source.startswith("hf:"):
        try:
            _local_files(source)
        except UserError as e:
            problems.append(str(e))
    for key, value in (("tokenizer.path", recipe.tokenizer.path), ("temperature.init_from", recipe.temperature.init_from)):
        if value and not Path(value).expanduser().exists():
            problems.append(f"{key}: {value!r} does not exist (relative paths are read from the folder llmtrain "
                            "runs in)")
    return problems


@recipe_app.command("keys")
@user_errors
def recipe_keys(
    section: Optional[str] = typer.Argument(None, metavar="[SECTION]", help="only this section, e.g. train or head",
                                            show_default=False),
):
    """Every key a recipe can set, with its type, default and meaning, from the one schema (head
    options included, with the heads that take them).

    Examples:

    \b
      llmtrain recipe keys
      llmtrain recipe keys head
    """
    import difflib

    from llmtrain.recipe import recipe_keys as keys

    docs = keys()
    sections = list(dict.fromkeys(d.key.split(".")[0] for d in docs))
    if section is not None and section not in sections:
        hint = difflib.get_close_matches(section, sections, n=1)
        raise UserError(f"recipe keys {section!r}: no such section; " +
                        (f"did you mean {hint[0]!r}?" if hint else f"choose one of {', '.join(sections)}"))
    for doc in docs:
        if section is None or doc.key.split(".")[0] == section:
            heads = f" (head.type {', '.join(doc.heads)})" if doc.heads else ""
            print(f"{doc.key}{heads}: {doc.type}, default {doc.default}\n    {doc.description}")


@recipe_app.command("list")
@user_errors
def recipe_list():
    """The recipes shipped with llmtrain (`llmtrain recipe copy NAME DEST` copies one).

    Example:

    \b
      llmtrain recipe list
    """
    from llmtrain.recipe import shipped_recipes

    for name, (path, summary) in shipped_recipes().items():
        print(f"{name:24} {summary}")


@recipe_app.command("copy")
@user_errors
def recipe_copy(
    name: str = typer.Argument(..., metavar="NAME", help="a shipped recipe (`llmtrain recipe list`)"),
    dest: Path = typer.Argument(..., metavar="DEST", help="the new recipe file, or a folder to put it in"),
):
    """Copy a shipped recipe to edit it (with the model folder it names, if any). Nothing is
    overwritten.

    Example:

    \b
      llmtrain recipe copy tiny my-tiny.yaml
    """
    from llmtrain.recipe import copy_recipe

    for path in copy_recipe(name, dest):
        err.print(f"wrote {path}")


from llmtrain.profile.report import profile as profile_command  # noqa: E402  (imports no torch)

app.command("profile")(user_errors(profile_command))
from llmtrain.bench import app as bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


def main():
    app()


if __name__ == "__main__":
    main()
