"""The report's PNG plots (matplotlib, headless): one figure per question, every run a line, each
figure written whether or not any run has the data (then it says so), always at SIZE pixels."""

from __future__ import annotations

import os
from pathlib import Path

from llmtrain.report.runs import Run, tempered_bpb

SIZE = (900, 540)  # pixels: width, height
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)


def _figure(plt, title: str, xlabel: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _finish(plt, fig, ax, path: Path, drawn: bool, missing: str) -> None:
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _line(ax, run: Run, xs, ys, suffix: str = "", **kwargs) -> bool:
    if not xs:
        return False
    label = run.label + suffix + (" (running)" if run.running else "")
    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label, **kwargs)
    return True


def write_plots(runs: list[Run], out: Path, seconds: float | None) -> dict[str, str]:
    """Write every plot into `out`; {file name: what it shows}."""
    plt = _pyplot()
    shown = {}

    def evals_plot(name, key, ylabel, x_of, xlabel, title, mark_seconds=False):
        fig, ax = _figure(plt, title, xlabel, ylabel)
        drawn = False
        for run in runs:
            points = [(x_of(run, r), r[key]) for r in run.evals if key in r]
            drawn |= _line(ax, run, [p[0] for p in points], [p[1] for p in points])
            if key == "val_bpb":  # a TempNet run: its tempered distribution too, dashed in the same colour
                tempered = [(x_of(run, r), bpb) for r in run.evals if (bpb := tempered_bpb(r)) is not None]
                _line(ax, run, [p[0] for p in tempered], [p[1] for p in tempered], suffix=" @τ", linestyle="--",
                      color=ax.lines[-1].get_color() if points else None)
        if mark_seconds and seconds is not None and drawn:
            ax.axvline(seconds, color="grey", linestyle="--", linewidth=1, label=f"equal wall-clock: {seconds:.0f} s")
        _finish(plt, fig, ax, out / name, drawn, f"no run reports {key}")
        shown[name] = title

    evals_plot("bpb_vs_tokens.png", "val_bpb", "bits per byte", lambda run, r: run.tokens_at(r["step"]),
               "training tokens", "Validation bits per byte against tokens")
    evals_plot("bpb_vs_seconds.png", "val_bpb", "bits per byte", lambda run, r: r["train_s"],
               "training seconds", "Validation bits per byte against training time", mark_seconds=True)
    evals_plot("top1_vs_tokens.png", "val_top1", "top-1 accuracy", lambda run, r: run.tokens_at(r["step"]),
               "training tokens", "Validation top-1 accuracy against tokens (every head, Z-loss included)")

    fig, ax = _figure(plt, "Training loss against steps", "step", "training loss")
    drawn = False
    for run in runs:
        drawn |= _line(ax, run, [r["step"] for r in run.train], [r["loss"] for r in run.train])
    _finish(plt, fig, ax, out / "loss_vs_steps.png", drawn, "no run has logged a step")
    shown["loss_vs_steps.png"] = "Training loss against steps (each head's own loss; TempNet's is the DRO loss)"

    fig, (speed, mfu) = plt.subplots(2, 1, sharex=True, figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    speed.set_title("Throughput and model FLOPs utilization against steps")
    speed.set_ylabel("tokens/s")
    mfu.set_ylabel("MFU")
    mfu.yaxis.set_major_formatter(_percent())
    mfu.set_xlabel("step")
    drawn = drawn_mfu = False
    for run in runs:
        drawn |= _line(speed, run, [r["step"] for r in run.train if "tokens_per_s" in r],
                       [r["tokens_per_s"] for r in run.train if "tokens_per_s" in r])
        drawn_mfu |= _line(mfu, run, [r["step"] for r in run.train if "mfu" in r],
                           [r["mfu"] for r in run.train if "mfu" in r])
    for ax, has, what in ((speed, drawn, "tokens_per_s"), (mfu, drawn_mfu, "mfu")):
        ax.grid(True, alpha=0.3)
        if has:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no run reports {what}", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save(fig, out / "throughput.png")
    plt.close(fig)
    shown["throughput.png"] = "Tokens per second and MFU per logged interval"
    return shown
