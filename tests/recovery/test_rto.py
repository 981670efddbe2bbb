"""Instant recovery RTO: command → replica VM running, and → the guest's first serial output,
for a 2 GiB and a 20 GiB (sparse) data disk holding 256 MiB of data; full restore is
measured alongside for the record.

The aim: instant recovery under 10 s and the same whatever the disk size. Figures are printed
(``-s``) as one JSON line per run for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from siterecovery.domain import ReplicationState
from siterecovery.hypervisor.guest import guest_cmdline
from siterecovery.hypervisor.process import QemuProcess
from siterecovery.recovery import instant
from siterecovery.recovery.failover import FailoverOptions
from siterecovery.recovery.replica import RecoveryMode
from siterecovery.vault import service

from .conftest import Site

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
GiB = 1 << 30
#: Data written at the start of each data disk (the rest is sparse).
FILL_MIB = 256


def _measure(site: Site, vm: str, mode: RecoveryMode) -> dict[str, float | str]:
    opts = FailoverOptions(mode=mode, append=guest_cmdline("idle"), hydrate=False)
    started = time.monotonic()
    outcome = site.failover.unplanned(vm, options=opts)
    running = time.monotonic() - started
    while not outcome.process.serial_text().strip():
        assert outcome.process.alive() and time.monotonic() - started < 120
        time.sleep(0.02)
    first_output = time.monotonic() - started
    outcome.process.wait_serial(r"^SR-BOOTED", 120)
    booted = time.monotonic() - started
    figures: dict[str, float | str] = {
        "vm": vm, "mode": str(mode), "running_s": round(running, 2),
        "first_output_s": round(first_output, 2), "booted_s": round(booted, 2),
    }  # fmt: skip
    print(json.dumps(figures))
    outcome.process.stop()
    instant.stop_pid(outcome.record.server_pid)
    service.transition(site.db, vm=vm, to_state=ReplicationState.COMMITTED, reason="done")
    return figures


def test_instant_recovery_rto_is_small_and_size_independent(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    results = {}
    for size in (2, 20):
        vm = f"vm-{size}g"
        protected_vm(vm, data_size=size * GiB, paused=True, fill_mib=FILL_MIB).kill()
        results[size] = _measure(site, vm, RecoveryMode.INSTANT)
    small, large = results[2], results[20]
    # The replica runs within seconds whatever the disk size (materializing 20 GiB would
    # not). Time to first output is the guest's own TCG boot on top, so it is compared
    # between sizes rather than against a wall-clock bound a loaded machine can miss;
    # the figures themselves are recorded by the benchmark harness (docs/benchmarks.md).
    for r in (small, large):
        assert float(r["running_s"]) < 10
    boot = float(small["first_output_s"])
    assert abs(float(large["first_output_s"]) - boot) < max(3.0, 0.5 * boot)


def test_full_restore_rto_for_comparison(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    for size in (2, 20):
        vm = f"vmf-{size}g"
        protected_vm(vm, data_size=size * GiB, paused=True, fill_mib=FILL_MIB).kill()
        figures = _measure(site, vm, RecoveryMode.FULL)
        assert float(figures["booted_s"]) > float(figures["running_s"])
