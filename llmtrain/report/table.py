"""The comparison table: one row per run, from its records, and the equal-wall-clock reading
(each run's validation value at the shortest run's training seconds, interpolated)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

from llmtrain.report.runs import Run, interpolate, tempered_bpb
from llmtrain.train.memory import format_bytes


def head_description(run: Run) -> str:
    """The head's type and the options that differ from its defaults; TempNet when attached."""
    from llmtrain.heads import head_class

    spec = dict(run.recipe.get("head", {}))
    kind = spec.pop("type", "softmax")
    try:
        defaults = head_class(kind).Options().model_dump()
    except (ValueError, TypeError):  # a head this llmtrain does not know: show every option
        defaults = {}
    options = [f"{k}={v}" for k, v in spec.items() if k not in defaults or defaults[k] != v]
    text = kind + (f" ({', '.join(options)})" if options else "")
    temperature = run.recipe.get("temperature") or {}
    if temperature.get("enabled"):
        text += f" + TempNet ({temperature.get('mode', 'joint')})"
    return text


def equal_time_seconds(runs: list[Run]) -> float | None:
    """The training seconds of the shortest run at its last evaluation; runs still going do not
    set it (unless all are), since their length is not final."""
    finished = [r for r in runs if r.evals and not r.running] or [r for r in runs if r.evals]
    return min((r.evals[-1]["train_s"] for r in finished), default=None)


def at_seconds(run: Run, key: str, seconds: float | None) -> float | None:
    """`key` of the run's evaluations at `seconds` of training, linear between evaluations; None
    before its first evaluation, past its last, or where it does not report `key`."""
    if seconds is None:
        return None
    points = [(r["train_s"], r[key]) for r in run.evals if key in r and "train_s" in r]
    return interpolate(points, seconds)


def median_of(records: list[dict[str, Any]], key: str) -> float | None:
    """Median over the logged intervals, leaving out the first (it holds start-up and warm-up)
    when there are others."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[Run, float | None], Any]
    fmt: Callable[[Any], str] = str
    optional: bool = False  # shown only when some run has a value (TempNet's columns)


def _last(key: str) -> Callable[[Run, float | None], Any]:
    return lambda run, _: next((r[key] for r in reversed(run.evals) if key in r), None)


def _best(key: str) -> Callable[[Run, float | None], Any]:
    return lambda run, _: min((r[key] for r in run.evals if key in r), default=None)


def _bpb_at_tau(run: Run, _) -> float | None:
    last = next((r for r in reversed(run.evals) if "val_loss_tau" in r), None)
    return None if last is None else tempered_bpb(last)


def _tau(run: Run, _) -> str | None:
    last = next((r for r in reversed(run.evals) if "val_tau_mean" in r), None)
    return None if last is None else f"{last['val_tau_mean']:.2f} [{last['val_tau_min']:.2f}, {last['val_tau_max']:.2f}]"


def _number(spec: str) -> Callable[[Any], str]:
    return lambda v: format(v, spec)


def _steps(run: Run, _) -> str:
    done = run.train[-1]["step"] if run.train else 0
    return f"{done}/{run.recipe.get('train', {}).get('steps', '?')}"


def _state(run: Run, _) -> str:
    state = run.state
    if state == "running":
        return "running"
    return state if run.evals else f"{state}, no eval"


COLUMNS = (
    Column("run", lambda run, _: run.label),
    Column("head", lambda run, _: head_description(run)),
    Column("state", _state),
    Column("steps", _steps),
    Column("tokens", lambda run, _: run.train[-1].get("tokens_seen") if run.train else None, _number(",")),
    Column("train s", lambda run, _: run.train[-1].get("train_s") if run.train else None, _number(".1f")),
    Column("tokens/s", lambda run, _: median_of(run.train, "tokens_per_s"), _number(",.0f")),
    Column("MFU", lambda run, _: median_of(run.train, "mfu"), _number(".2%")),
    Column("peak mem/rank", lambda run, _: max((r["peak_mem_bytes"] for r in run.train if "peak_mem_bytes" in r),
                                               default=None), format_bytes),
    Column("val loss", _last("val_loss"), _number(".4f")),
    Column("best val loss", _best("val_loss"), _number(".4f")),
    Column("ppl", _last("val_ppl"), _number(".2f")),
    Column("bits/byte", _last("val_bpb"), _number(".4f")),
    Column("best bits/byte", _best("val_bpb"), _number(".4f")),
    Column("ppl @τ", _last("val_ppl_tau"), _number(".2f"), optional=True),
    Column("bits/byte @τ", _bpb_at_tau, _number(".4f"), optional=True),
    Column("τ mean [min, max]", _tau, optional=True),
    Column("top-1", _last("val_top1"), _number(".4f")),
    Column("top-5", _last("val_top5"), _number(".4f")),
    Column("top-10", _last("val_top10"), _number(".4f")),
    Column("bits/byte @T", lambda run, t: at_seconds(run, "val_bpb", t), _number(".4f")),
    Column("top-1 @T", lambda run, t: at_seconds(run, "val_top1", t), _number(".4f")),
)
MISSING = "–"


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[Any]], float | None]:
    """(titles, raw values per run, T): the values unformatted, for the markdown and for tests."""
    columns, rows, seconds = _table(runs)
    return [c.title for c in columns], rows, seconds


def _table(runs: list[Run]) -> tuple[list[Column], list[list[Any]], float | None]:
    seconds = equal_time_seconds(runs)
    values = [[c.value(run, seconds) for c in COLUMNS] for run in runs]
    keep = [i for i, c in enumerate(COLUMNS) if not c.optional or any(row[i] is not None for row in values)]
    return [COLUMNS[i] for i in keep], [[row[i] for i in keep] for row in values], seconds


def markdown_table(runs: list[Run]) -> str:
    columns, rows, seconds = _table(runs)
    titles = [c.title for c in columns]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join(" --- " if i < 3 else " ---: " for i in range(len(titles))) + "|"]
    for row in rows:
        cells = [MISSING if v is None else c.fmt(v) for c, v in zip(columns, row)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    t = "no run has an evaluation" if seconds is None else f"T = {seconds:.1f} s"
    return "\n".join(lines) + f"\n\n@T: at equal wall-clock, {t} of training (the shortest run's), interpolated " \
        "linearly between evaluations; – where a run had not evaluated by then (a smaller eval.every reads finer).\n"
