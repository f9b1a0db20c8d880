"""`llmtrain study`: variants of one recipe trained one after another, each an ordinary run folder
under --out (`llmtrain run` in a subprocess, as a user would run it), then the compare report.

Resumable: study.yaml records the command; run again, a complete variant is skipped and any other
continues from its newest checkpoint (`--resume auto`). A stop signal is passed to the run in
progress (it saves and stops) and no further variant starts. With --equal-time every variant after
the first also trains, in NAME-equal-time, for as many steps as fit in the first variant's
training seconds at its own measured speed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from llmtrain.errors import UserError
from llmtrain.report.runs import read_records
from llmtrain.train.status import read_status

STUDY = "study.yaml"
REPORT = "report"
EQUAL_TIME = "-equal-time"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Variant:
    name: str
    overrides: list[str]


def parse_study_args(args: list[str]) -> tuple[list[str], list[Variant]]:
    """(overrides for every variant, variants) from `KEY=VAL... --variant NAME KEY=VAL... ...`."""
    common: list[str] = []
    variants: list[Variant] = []
    it = iter(args)
    for arg in it:
        if arg == "--variant":
            name = next(it, None)
            # a dotted KEY=VALUE here is an override whose NAME was forgotten (names may hold '=')
            if name is None or name.startswith("-") or "." in name.partition("=")[0] and "=" in name:
                raise UserError(f"--variant needs a NAME before its KEY=VALUE overrides, got {name!r}; e.g. "
                                "--variant hsm head.type=hsm")
            if not re.fullmatch(r"[\w.,=+-]+", name) or name in (".", "..", REPORT) or name.endswith(EQUAL_TIME):
                raise UserError(f"--variant {name!r}: the name is a folder under --out; use letters, digits and "
                                f"'_ . , = + -' (not '{REPORT}', not ending in '{EQUAL_TIME}')")
            if any(v.name == name for v in variants):
                raise UserError(f"--variant {name!r} is given twice; each variant needs its own name")
            variants.append(Variant(name, []))
        elif arg.startswith("-"):
            raise UserError(f"{arg}: unknown option; study takes --variant NAME KEY=VALUE..., --equal-time and --out")
        elif "=" not in arg:
            raise UserError(f"{arg!r}: expected KEY=VALUE (a recipe override) after the recipe or a --variant NAME")
        else:
            (variants[-1].overrides if variants else common).append(arg)
    if not variants:
        raise UserError("no --variant given; e.g. --variant softmax head.type=softmax --variant hsm head.type=hsm")
    return common, variants


def run_study(recipe_path: Path, common: list[str], variants: list[Variant], out: Path, equal_time: bool,
              log=print) -> int:
    """Train the variants not yet complete, then write the report; the exit code."""
    from llmtrain.recipe import load_recipe
    from llmtrain.report.index import compare_runs

    for v in variants:  # every recipe problem now, before anything trains
        try:
            load_recipe(recipe_path, [*common, *v.overrides])
        except UserError as e:
            raise UserError(f"--variant {v.name}: {e}") from None
    _claim(out, {"recipe": str(recipe_path), "overrides": common, "variants": [asdict(v) for v in variants],
                 "equal_time": equal_time})
    stop = _StopForwarding()
    folders = []
    try:
        for i, v in enumerate(variants):
            runs = [(v.name, v.overrides)]
            if equal_time and i > 0:  # its steps follow from the equal-steps run, trained first
                runs.append((v.name + EQUAL_TIME, None))
            for name, overrides in runs:
                if overrides is None:
                    overrides = [*v.overrides, f"train.steps={equal_time_steps(out / variants[0].name, out / v.name)}"]
                code = _train(recipe_path, [*common, *overrides], out / name, stop, log)
                if code is not None:
                    return code
                folders.append(out / name)
    finally:
        stop.restore()
    index = compare_runs(folders, out / REPORT)
    log(f"study: report {index}")
    return 0


def equal_time_steps(reference: Path, run: Path) -> int:
    """Steps `run` would take to train for `reference`'s training seconds at its own pace."""
    def steps_and_seconds(folder: Path) -> tuple[int, float]:
        last = [r for r in read_records(folder / "metrics.jsonl") if "train_s" in r][-1]
        return last["step"], last["train_s"]

    ref_steps, ref_seconds = steps_and_seconds(reference)
    steps, seconds = steps_and_seconds(run)
    return max(1, round(steps * ref_seconds / seconds))


def _claim(out: Path, plan: dict) -> None:
    """Write study.yaml, or check that the one there describes the same study."""
    path = out / STUDY
    if path.is_file():
        if yaml.safe_load(path.read_text()) != plan:
            raise UserError(f"--out {out}: it holds another study ({path} records other variants or options); "
                            "run that study's own command to continue it, or choose another --out (nothing was changed)")
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder holds something other than a study (no {STUDY}); choose a new "
                        "or empty folder (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{STUDY}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(plan, sort_keys=False))
    os.replace(tmp, path)


def _train(recipe_path: Path, overrides: list[str], folder: Path, stop: "_StopForwarding", log) -> int | None:
    """Train one variant to completion; None when it is complete, else the study's exit code."""
    if read_status(folder).get("state") == "complete":
        log(f"study: {folder.name} is complete, skipped")
        return None
    if stop.seen:
        log(f"study: stopped by {stop.seen}; run the same command to continue")
        return 0
    resume = ["--resume", "auto"] if folder.exists() else []
    cmd = [sys.executable, "-m", "llmtrain.cli", "run", str(recipe_path), *overrides, "--out", str(folder), *resume]
    log(f"study: {folder.name}: llmtrain run {' '.join(cmd[4:])}")
    code = stop.run(cmd)
    state = read_status(folder).get("state")
    if code == 0 and state == "complete":
        return None
    if code == 0:  # stopped by a signal and saved
        log(f"study: {folder.name} {state}; run the same command to continue")
        return 0
    log(f"study: {folder.name} ended with exit code {code} (status: {state}); see {folder}; run the same command "
        "to continue once fixed")
    return code


class _StopForwarding:
    """While a run trains, a stop signal to the study goes to it (in its own session, so a
    terminal's Ctrl-C reaches it once, through us); the study starts nothing after one."""

    def __init__(self):
        self.seen: str | None = None
        self.child: subprocess.Popen | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame):
        self.seen = signal.Signals(signum).name
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, cmd: list[str]) -> int:
        self.child = subprocess.Popen(cmd, start_new_session=True)
        try:
            return self.child.wait()
        finally:
            self.child = None

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
