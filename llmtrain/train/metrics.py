"""Where rank 0's numbers go: metrics.jsonl (one JSON object per record), TensorBoard when it is
installed, and the console — a rich live view on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llmtrain.errors import UserError
from llmtrain.train.memory import format_bytes


def read_metrics(path: Path, then: str = "") -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """(line, record) of each line of metrics.jsonl (none without the file), and a last line torn
    by a run that ended — or is — mid-write, left out (None when there is none). A line that is not
    JSON anywhere else is an error naming it; `then` is added to its advice."""
    if not path.exists():
        return [], None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON ({line[:60]!r}); repair or remove that line{then}") from None
            return parsed, line
    return parsed, None


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step`: a resumed run re-logs the steps after its checkpoint. A last line
    torn by a crash mid-write is dropped too (with a note); damage anywhere else is an error."""
    if not path.exists():
        return
    parsed, torn = read_metrics(path, then=", then resume")
    if torn is not None:
        print(f"note: {path}: dropped a torn last line ({torn[:60]!r}), left by a run that ended mid-write",
              file=sys.stderr, flush=True)
    path.write_text("".join(line + "\n" for line, record in parsed if record.get("step", 0) <= step))


class MetricsSink:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, live: bool | None = None):
        self.path = run_dir / "metrics.jsonl"
        truncate_after(self.path, start_step)
        self.file = self.path.open("a")
        self.console = Console(stderr=False)
        self.live = sys.stdout.isatty() if live is None else live
        self.total = total_steps
        self.tb = _tensorboard(run_dir / "tb")
        self.progress = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, refresh_per_second=4,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self.progress.start()

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        line = _summary(record)
        if self.progress:
            if "loss" in record:
                self.progress.update(self.task, completed=step, stats=line)
            else:
                self.progress.console.print(f"[cyan]eval[/] step {step}: {line}")
        else:
            print(f"{'eval ' if 'loss' not in record else ''}step {step}/{self.total} {line}", flush=True)

    def message(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.tb:
            self.tb.close()
        self.file.close()


def _summary(r: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val_loss {:.4f}"), ("val_ppl", "ppl {:.2f}"),
                     ("val_bpb", "bpb {:.3f}"), ("val_top1", "top1 {:.3f}"), ("val_top5", "top5 {:.3f}"),
                     ("lr", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}")):
        if key in r:
            parts.append(fmt.format(r[key]))
    for prefix in ("", "val_"):  # the temperature network's τ: mean [min, max]
        if f"{prefix}tau_mean" in r:
            parts.append(f"τ {r[prefix + 'tau_mean']:.2f} [{r[prefix + 'tau_min']:.2f}, {r[prefix + 'tau_max']:.2f}]")
    if "val_ppl_tau" in r:
        parts.append(f"ppl@τ {r['val_ppl_tau']:.2f}")
    if "peak_mem_bytes" in r:
        parts.append(f"mem {format_bytes(r['peak_mem_bytes'])}")
    return "  ".join(parts)


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))
