"""A description of the machine a run happened on, stored with its results.

``describe()`` returns::

    {"cpu_model": str, "cores": int, "memory_bytes": int, "kernel": str, "os": str,
     "python": str, "filesystem": str, "tools": {"qemu-img": "version line", ...}}

Every field is read, never guessed: a value that cannot be read is ``"unknown"`` (or 0).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

_TOOLS = {
    "qemu-img": ["qemu-img", "--version"],
    "qemu-storage-daemon": ["qemu-storage-daemon", "--version"],
    "rsync": ["rsync", "--version"],
    "restic": ["restic", "version"],
    "borg": ["borg", "--version"],
    "cp": ["cp", "--version"],
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip('"')
    except OSError:
        pass
    return "unknown"


def tool_version(argv: list[str]) -> str:
    """First line of a tool's version output, or ``"not installed"``."""
    if shutil.which(argv[0]) is None:
        return "not installed"
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _filesystem(path: Path) -> str:
    result = subprocess.run(
        ["df", "--output=fstype", str(path)], capture_output=True, text=True, check=False
    )
    lines = result.stdout.split()
    return lines[-1] if result.returncode == 0 and len(lines) > 1 else "unknown"


def describe(workdir: Path) -> dict[str, Any]:
    """The machine description; ``workdir`` is where the images and stores live."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_bytes": _memory_bytes(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "filesystem": _filesystem(workdir),
        "tools": {name: tool_version(argv) for name, argv in _TOOLS.items()},
    }


def summary_line(machine: dict[str, Any]) -> str:
    """One line for the report: cores, CPU model, memory, kernel, OS."""
    memory = machine.get("memory_bytes", 0) / (1 << 30)
    return (
        f"{machine.get('cores')} cores, {machine.get('cpu_model')}, {memory:.1f} GiB memory, "
        f"Linux {machine.get('kernel')}, {machine.get('os')}, work dir on "
        f"{machine.get('filesystem')}"
    )
