"""Rank variables for a worker started by `srun` (one task per GPU).

DeepSpeed and torch.distributed read RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
nothing in them reads SLURM's own variables, so a worker under `srun` maps them itself:
SLURM_PROCID → RANK, SLURM_LOCALID → LOCAL_RANK, SLURM_NTASKS → WORLD_SIZE, and the first host
of SLURM_JOB_NODELIST → MASTER_ADDR (what `scontrol show hostnames` would print first).
"""

from __future__ import annotations

import re
from typing import Mapping

from llmtrain.errors import UserError

REQUIRED = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")
# Ports derived from the job id stay out of the usual ephemeral range (32768+), so two jobs
# sharing a node rarely collide and every task of one job computes the same port.
PORT_BASE, PORT_SPAN = 15000, 15000


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, e.g. 'gpu[01-03,07],login-2' → ['gpu01', 'gpu02', 'gpu03',
    'gpu07', 'login-2']. Ranges keep their zero padding; several bracket groups multiply out."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts += _expand_host(item)
    if not hosts:
        raise ValueError("empty host list")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in {text!r}")
    items.append(text[start:])
    if any(not item for item in items):
        raise ValueError(f"empty host name in {text!r}")
    return items


def _expand_host(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        if "[" in item or "]" in item:
            raise ValueError(f"bad brackets in {item!r}")
        return [item]
    head, tail = item[: match.start()], item[match.end():]
    values = []
    for part in match.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in {item!r}")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in {item!r}")
        values += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return [host for v in values for host in _expand_host(head + v + tail)]


def rank_env(environ: Mapping[str, str], master_port: int | None = None) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from SLURM's variables.

    A MASTER_ADDR / MASTER_PORT already in the environment wins (a site may route the rendezvous
    through another interface); otherwise the port is `master_port`, else derived from SLURM_JOB_ID.
    """
    missing = [name for name in REQUIRED if not environ.get(name)]
    if missing:
        raise UserError(f"{', '.join(missing)}: not set; `llmtrain.train --slurm` must run as a task of "
                        "`srun` inside a SLURM allocation (see launch/slurm.sbatch)")
    numbers = {}
    for name in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        value = environ[name]
        if not value.isdigit():
            raise UserError(f"{name}={value!r}: expected a non-negative integer")
        numbers[name] = int(value)
    if not numbers["SLURM_PROCID"] < numbers["SLURM_NTASKS"]:
        raise UserError(f"SLURM_PROCID={numbers['SLURM_PROCID']} is not below SLURM_NTASKS={numbers['SLURM_NTASKS']}")
    try:
        first_host = expand_nodelist(environ["SLURM_JOB_NODELIST"])[0]
    except ValueError as e:
        raise UserError(f"SLURM_JOB_NODELIST={environ['SLURM_JOB_NODELIST']!r}: cannot read it ({e})") from None
    if environ.get("MASTER_PORT"):
        port = environ["MASTER_PORT"]
    elif master_port is not None:
        port = str(master_port)
    else:
        job = environ.get("SLURM_JOB_ID", "0")
        port = str(PORT_BASE + (int(job) if job.isdigit() else 0) % PORT_SPAN)
    return {
        "RANK": str(numbers["SLURM_PROCID"]),
        "LOCAL_RANK": str(numbers["SLURM_LOCALID"]),
        "WORLD_SIZE": str(numbers["SLURM_NTASKS"]),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host,
        "MASTER_PORT": port,
    }
