"""What this host's QEMU can run, and a :class:`VmConfig` brought within it.

:func:`host_capabilities` asks ``qemu-system-x86_64 -machine none`` once per accelerator
(cached for the process) over QMP on stdio: ``query-machines`` (names, aliases, the default,
``cpu-max``) and ``query-cpu-definitions`` (models and, under that accelerator, their
``unavailable-features``: under TCG ``host`` lacks ``kvm``, ``Skylake-Client`` lacks ``pcid``...).

:func:`honour` is pure: it returns the config to start and one warning per setting it had to
change, never dropping one silently and never failing for one:

- a machine type this QEMU lacks -> the same family's current type (``pc-i440fx-9.0`` ->
  ``pc``, ``pc-q35-*`` -> ``q35``), else the host's default machine;
- more vCPUs than the machine's ``cpu-max`` -> ``cpu-max``;
- a CPU model this QEMU lacks, or one that needs another accelerator (``host`` under TCG) ->
  ``max`` (every feature this accelerator offers); a model that lacks some features here is
  kept, and the warning names the features the guest will not see;
- ``cache.direct`` on a recovery directory whose filesystem refuses O_DIRECT ->
  ``direct`` off.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from siterecovery.domain import DiskCache, DiskConfig, VmConfig
from siterecovery.hypervisor.errors import ProcessError
from siterecovery.hypervisor.process import ACCELS, QEMU_BINARY

__all__ = ["Honoured", "HostCapabilities", "honour", "host_capabilities", "supports_direct_io"]

FALLBACK_CPU = "max"
#: unavailable-features entries that mean "needs this accelerator", not "lacks a feature".
_ACCEL_FEATURES = frozenset({"kvm", "hvf", "whpx"})
_PROBE_TIMEOUT_S = 30


@dataclass(frozen=True)
class HostCapabilities:
    """What the QEMU of this host runs under ``accel``.

    ``machines`` maps every machine name and alias to its ``cpu-max``; ``aliases`` maps an
    alias to the versioned type; ``cpu_models`` maps a model to its unavailable features.
    """

    accel: str
    qemu: str
    machines: dict[str, int]
    aliases: dict[str, str]
    default_machine: str
    cpu_models: dict[str, tuple[str, ...]]

    @classmethod
    def parse(cls, accel: str, qemu: str, machines: Any, cpus: Any) -> HostCapabilities:
        """From the answers of ``query-machines`` and ``query-cpu-definitions``."""
        sizes = {str(m["name"]): int(m.get("cpu-max", 1)) for m in machines}
        aliases = {str(m["alias"]): str(m["name"]) for m in machines if m.get("alias")}
        sizes.update({alias: sizes[name] for alias, name in aliases.items()})
        default = next((str(m["name"]) for m in machines if m.get("is-default")), "q35")
        models = {str(c["name"]): tuple(c.get("unavailable-features", ())) for c in cpus}
        return cls(accel, qemu, sizes, aliases, default, models)


@functools.cache
def host_capabilities(accel: str) -> HostCapabilities:
    """Probe this host's QEMU under ``accel`` (once per process); ProcessError if it fails."""
    if accel not in ACCELS:
        raise ProcessError(f"unknown accelerator {accel!r}")
    answers = _qmp_stdio(
        [QEMU_BINARY, "-machine", f"none,accel={accel}", "-nodefaults", "-no-user-config",
         "-display", "none", "-qmp", "stdio"],
        ["query-machines", "query-cpu-definitions"],
    )  # fmt: skip
    version = answers[0]["QMP"]["version"]["qemu"]
    qemu = f"QEMU {version['major']}.{version['minor']}.{version['micro']}"
    return HostCapabilities.parse(accel, qemu, answers[1], answers[2])


def _qmp_stdio(argv: list[str], commands: list[str]) -> list[Any]:
    """Run ``commands`` on a QMP monitor on stdio: [greeting, answer, ...]."""
    script = [{"execute": "qmp_capabilities"}, *({"execute": c} for c in commands),
              {"execute": "quit"}]  # fmt: skip
    try:
        done = subprocess.run(
            argv, input="".join(json.dumps(c) + "\n" for c in script), capture_output=True,
            text=True, timeout=_PROBE_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProcessError(f"cannot probe {argv[0]}: {exc}") from exc
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    greeting = [r for r in replies if "QMP" in r]
    answers = [r["return"] for r in replies if "return" in r]
    if not greeting or len(answers) < len(commands) + 1:
        raise ProcessError(f"{argv[0]} did not answer its probe: {done.stderr[-2000:]}")
    return [greeting[0], *answers[1 : len(commands) + 1]]


def supports_direct_io(directory: Path) -> bool:
    """True when files in ``directory`` can be opened with O_DIRECT (not on every filesystem)."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".sr-odirect-") as tmp:
        try:
            fd = os.open(Path(tmp) / "probe", flags, 0o600)
        except OSError:
            return False
        os.close(fd)
    return True


# ---------------------------------------------------------------------------------------------
# Honouring a config


@dataclass(frozen=True)
class Honoured:
    """The config to start on this host, and what had to change (one line per setting)."""

    config: VmConfig
    warnings: tuple[str, ...] = ()


def honour(config: VmConfig, host: HostCapabilities, *, direct_io: bool = True) -> Honoured:
    """``config`` within what ``host`` runs (see the module docstring); pure."""
    warnings: list[str] = []
    machine = _machine(config.machine, host, warnings)
    cpus = _cpus(config.cpus, machine, host, warnings)
    cpu_model = _cpu_model(config.cpu_model, host, warnings)
    disks = tuple(_disk(d, direct_io, warnings) for d in config.disks)
    honoured = replace(config, machine=machine, cpus=cpus, cpu_model=cpu_model, disks=disks)
    return Honoured(honoured, tuple(warnings))


def _machine(wanted: str, host: HostCapabilities, warnings: list[str]) -> str:
    if wanted in host.machines:
        return wanted
    family = _family(wanted)
    chosen = family if family in host.machines else host.default_machine
    runs = host.aliases.get(chosen, chosen)
    warnings.append(
        f"machine type {wanted} is not available on this recovery host ({host.qemu}): "
        f"the replica runs machine type {chosen} ({runs})"
    )
    return chosen


def _family(machine: str) -> str:
    """The alias of a versioned x86 machine type's family ("pc-q35-7.2" -> "q35")."""
    if machine.startswith("pc-q35-"):
        return "q35"
    if machine.startswith("pc-i440fx-") or machine.startswith("pc-"):
        return "pc"
    return machine


def _cpus(wanted: int, machine: str, host: HostCapabilities, warnings: list[str]) -> int:
    limit = host.machines.get(machine, wanted)
    if wanted <= limit:
        return wanted
    warnings.append(
        f"{wanted} vCPUs are more than machine type {machine} takes here ({limit}): "
        f"the replica runs {limit} vCPUs"
    )
    return limit


def _cpu_model(wanted: str, host: HostCapabilities, warnings: list[str]) -> str:
    if not wanted:
        return wanted
    missing = host.cpu_models.get(wanted)
    if missing is None:
        warnings.append(
            f"CPU model {wanted} is unknown to this recovery host ({host.qemu}): the replica "
            f"runs CPU model {FALLBACK_CPU}"
        )
        return FALLBACK_CPU
    needs = sorted(_ACCEL_FEATURES.intersection(missing))
    if needs:
        warnings.append(
            f"CPU model {wanted} needs {'/'.join(needs)}, this recovery host runs replicas "
            f"under {host.accel}: the replica runs CPU model {FALLBACK_CPU} (every feature "
            f"{host.accel} offers)"
        )
        return FALLBACK_CPU
    if missing:
        warnings.append(
            f"CPU model {wanted} lacks features {', '.join(missing)} under {host.accel} on "
            "this recovery host: the guest sees the model without them"
        )
    return wanted


def _disk(disk: DiskConfig, direct_io: bool, warnings: list[str]) -> DiskConfig:
    if not disk.cache.direct or direct_io:
        return disk
    warnings.append(
        f"disk {disk.name} uses direct I/O (cache.direct), which the recovery directory's "
        "filesystem does not support: the replica's disk runs without it"
    )
    return replace(disk, cache=DiskCache(disk.cache.writeback, False, disk.cache.no_flush))
