"""DeepSpeed hostfiles (`host slots=N` per line, `#` comments): read and checked before anything
starts, so a typo is reported with its file and line instead of surfacing in a remote shell."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from llmtrain.errors import UserError

LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:-]+)\s+slots\s*=\s*(?P<slots>\d+)$")


class Host(NamedTuple):
    name: str
    slots: int


def read_hostfile(path: Path) -> list[Host]:
    """The hosts in order; raises UserError naming every bad line of `path`."""
    if not path.is_file():
        raise UserError(f"--hostfile {path}: file not found")
    hosts: list[Host] = []
    problems: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = LINE.match(line)
        if not match:
            problems.append(f"line {number}: {raw.strip()!r}: expected 'HOSTNAME slots=N'")
            continue
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            problems.append(f"line {number}: {host}: slots must be at least 1")
        elif any(h.name == host for h in hosts):
            problems.append(f"line {number}: {host} is listed twice")
        else:
            hosts.append(Host(host, slots))
    if not hosts and not problems:
        problems.append("no hosts listed")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"--hostfile {path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n{lines}")
    return hosts
