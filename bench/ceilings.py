"""Hash and compression ceilings of this machine, to read the other rows against.

Measured in this process on workload data (log-like text and random regions of the reference
workload, ``sample`` bytes each), in blocks of ``block`` bytes (the store's block size):

- ``blake3`` one thread, and with all cores (``max_threads=AUTO``), as siterecovery hashes;
- ``sha256`` (hashlib), what restic and borg hash with, for comparison;
- ``zstd`` compress at levels 1, 3 (siterecovery's default) and 9, and decompress, with the
  compression ratio — on text (compressible) and on random data (the incompressible bound).

Each figure is the median of ``runs`` passes over the sample, in MB/s of input.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import blake3
import zstandard

from bench.stats import summarize, throughput
from bench.workload import Kind, WorkloadSpec, region_data

LEVELS = (1, 3, 9)


def sample(spec: WorkloadSpec, kind: Kind, size: int) -> bytes:
    """``size`` bytes made of the workload's regions of ``kind`` (same generator)."""
    pieces: list[bytes] = []
    index = total = 0
    while total < size:
        pieces.append(region_data(spec, 10_000 + index, kind))
        total += len(pieces[-1])
        index += 1
    return b"".join(pieces)[:size]


def _rate(fn: Callable[[memoryview], object], data: bytes, block: int, runs: int) -> float:
    view = memoryview(data)
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for offset in range(0, len(view), block):
            fn(view[offset : offset + block])
        rates.append(throughput(len(data), time.perf_counter() - start))
    return summarize(rates).median


def _hash_rates(data: bytes, block: int, runs: int) -> dict[str, float]:
    return {
        "blake3 (1 thread)": _rate(lambda b: blake3.blake3(b).digest(), data, block, runs),
        "blake3 (all cores)": _rate(
            lambda b: blake3.blake3(b, max_threads=blake3.blake3.AUTO).digest(), data, block, runs
        ),
        "sha256": _rate(lambda b: hashlib.sha256(b).digest(), data, block, runs),
    }


def _decompress_rate(frames: list[bytes], size: int, runs: int) -> float:
    decomp = zstandard.ZstdDecompressor()
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for frame in frames:
            decomp.decompress(frame)
        rates.append(throughput(size, time.perf_counter() - start))
    return summarize(rates).median


def _zstd_rates(data: bytes, block: int, runs: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for level in LEVELS:
        comp = zstandard.ZstdCompressor(level=level, write_content_size=True)
        frames = [comp.compress(data[o : o + block]) for o in range(0, len(data), block)]
        out[f"zstd -{level}"] = {
            "compress_mb_per_s": _rate(comp.compress, data, block, runs),
            "decompress_mb_per_s": _decompress_rate(frames, len(data), runs),
            "ratio": len(data) / sum(len(frame) for frame in frames),
        }
    return out


def measure(spec: WorkloadSpec, *, size: int, block: int, runs: int) -> dict[str, Any]:
    """All ceilings (see the module docstring) as a JSON-ready dict."""
    text, noise = sample(spec, Kind.TEXT, size), sample(spec, Kind.RANDOM, size)
    return {
        "sample_bytes": size,
        "block_bytes": block,
        "runs": runs,
        "hash_mb_per_s": _hash_rates(noise, block, runs),
        "zstd_text": _zstd_rates(text, block, runs),
        "zstd_random": _zstd_rates(noise, block, runs),
    }
