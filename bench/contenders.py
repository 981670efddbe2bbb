"""The anchors siterecovery is measured against, as :class:`bench.harness.Contender` objects.

Each anchor works on raw image files (``src/disk.raw``, the reference image; for delta rows
the same path holds the changed image) and writes into its own destination under the work
directory. Destinations and repositories are rebuilt by ``prepare`` before every run (not
timed): an initial run starts from an empty destination, a delta run from a copy of a template
that already holds the unchanged image.

Figures collected after a run (all in bytes):

- ``bytes_stored``: apparent size of the destination tree (what a reader gets back),
  ``bytes_allocated``: its allocated blocks (what the disk really holds);
- ``bytes_shipped``: for rsync, ``Total bytes sent`` of ``--stats`` (sender → receiver); for
  repository tools and ours, growth of the destination's allocated size during the run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.harness import BenchError, Contender, Figures

RESTIC_ENV = {"RESTIC_PASSWORD": "siterecovery-bench"}
BORG_ENV = {
    "BORG_PASSPHRASE": "",
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
}


def tree_size(path: Path) -> tuple[int, int]:
    """``(apparent, allocated)`` bytes of the file or directory tree at ``path`` (0 if absent)."""
    if not path.exists():
        return 0, 0
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    apparent = allocated = 0
    for file in files:
        info = file.lstat()
        apparent += info.st_size
        allocated += info.st_blocks * 512
    return apparent, allocated


def stored_figures(path: Path) -> Figures:
    apparent, allocated = tree_size(path)
    return {"bytes_stored": apparent, "bytes_allocated": allocated}


def reset_dir(path: Path) -> Path:
    """Remove ``path`` and make it again, empty."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _fresh(path: Path) -> Callable[[], None]:
    """prepare(): an empty ``path``."""

    def prepare() -> None:
        reset_dir(path)

    return prepare


def copy_tree(template: Path, dest: Path) -> None:
    """Replace ``dest`` by a copy of ``template`` (files copied sparse)."""
    shutil.rmtree(dest, ignore_errors=True)
    run_quiet(["cp", "-a", "--sparse=always", str(template), str(dest)])


def run_quiet(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Run an untimed setup command; raise :class:`BenchError` with its stderr on failure."""
    result = subprocess.run(
        argv, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} failed: {result.stderr.strip()[-1500:]}")
    return result.stdout


@dataclass
class Places:
    """Where the anchors read and write: ``source`` is the raw image, ``root`` their area."""

    source: Path
    root: Path

    def dest(self, name: str) -> Path:
        return self.root / name


def _grown(path: Path, before: Callable[[], int]) -> Callable[[str], Figures]:
    """collect(): stored figures plus ``bytes_shipped`` = allocated growth since ``before()``."""

    def collect(_stdout: str) -> Figures:
        figures = stored_figures(path)
        figures["bytes_shipped"] = max(0, figures["bytes_allocated"] - before())
        return figures

    return collect


# -- initial copies --------------------------------------------------------------------------


def cp_sparse(places: Places) -> Contender:
    dest = places.dest("cp")
    return Contender(
        name="cp --sparse=always",
        argv=lambda: ["cp", "--sparse=always", str(places.source), str(dest / "disk.raw")],
        prepare=_fresh(dest),
        collect=lambda _out: stored_figures(dest),
    )


def qemu_img_convert(
    places: Places,
    *,
    out_fmt: str = "qcow2",
    source: Path | None = None,
    src_fmt: str = "raw",
    name: str = "qemu-img convert",
) -> Contender:
    """``qemu-img convert`` from ``source`` (default: the raw image) to ``out_fmt``."""
    dest = places.dest(f"qemu-img-{out_fmt}")
    src = source or places.source
    return Contender(
        name=name,
        argv=lambda: [
            "qemu-img",
            "convert",
            "-f",
            src_fmt,
            "-O",
            out_fmt,
            str(src),
            str(dest / f"disk.{out_fmt}"),
        ],
        prepare=_fresh(dest),
        collect=lambda _out: stored_figures(dest),
    )


def rsync_full(places: Places) -> Contender:
    dest = places.dest("rsync-full")
    return Contender(
        name="rsync (full)",
        argv=lambda: ["rsync", "--sparse", "--stats", str(places.source), str(dest / "disk.raw")],
        prepare=_fresh(dest),
        collect=lambda out: {**stored_figures(dest), **_rsync_sent(out)},
    )


def restic_init(repo: Path) -> None:
    shutil.rmtree(repo, ignore_errors=True)
    run_quiet(["restic", "init", "--repo", str(repo)], RESTIC_ENV)


def _restic_argv(repo: Path, source: Path) -> list[str]:
    return [
        "restic",
        "--repo",
        str(repo),
        "--no-cache",
        "--quiet",
        "backup",
        "--host",
        "bench",
        str(source),
    ]


def restic_backup(places: Places) -> Contender:
    repo = places.dest("restic")
    return Contender(
        name="restic backup",
        argv=lambda: _restic_argv(repo, places.source),
        prepare=lambda: restic_init(repo),
        collect=lambda _out: stored_figures(repo),
        env=RESTIC_ENV,
    )


def borg_init(repo: Path, base: Path) -> None:
    for path in (repo, base):
        shutil.rmtree(path, ignore_errors=True)
    env = {**BORG_ENV, "BORG_BASE_DIR": str(base)}
    run_quiet(["borg", "init", "--encryption", "none", str(repo)], env)


_borg_serial = [0]


def _borg_argv(repo: Path, source: Path) -> list[str]:
    _borg_serial[0] += 1  # archive names must be unique within a repository
    return ["borg", "create", f"{repo}::bench-{_borg_serial[0]}", str(source)]


def borg_create(places: Places) -> Contender:
    repo, base = places.dest("borg"), places.dest("borg-base")
    return Contender(
        name="borg create",
        argv=lambda: _borg_argv(repo, places.source),
        prepare=lambda: borg_init(repo, base),
        collect=lambda _out: stored_figures(repo),
        env={**BORG_ENV, "BORG_BASE_DIR": str(base)},
    )


# -- delta cycles (templates hold the unchanged image) ----------------------------------------


def _rsync_sent(stdout: str) -> Figures:
    match = re.search(r"Total bytes sent: ([\d,]+)", stdout)
    return {"bytes_shipped": int(match.group(1).replace(",", ""))} if match else {}


def rsync_delta(places: Places, unchanged: Path) -> Contender:
    """rsync's delta algorithm (``--inplace --no-whole-file``) onto a copy of ``unchanged``."""
    dest = places.dest("rsync-delta")

    def prepare() -> None:
        reset_dir(dest)
        run_quiet(["cp", "--sparse=always", str(unchanged), str(dest / "disk.raw")])

    return Contender(
        name="rsync --inplace --no-whole-file",
        argv=lambda: [
            "rsync",
            "--inplace",
            "--no-whole-file",
            "--stats",
            str(places.source),
            str(dest / "disk.raw"),
        ],
        prepare=prepare,
        collect=lambda out: {**stored_figures(dest), **_rsync_sent(out)},
    )


@dataclass
class Templates:
    """Repositories holding one backup of the unchanged image, copied before each delta run."""

    restic: Path
    borg_repo: Path
    borg_base: Path


def make_templates(places: Places, root: Path) -> Templates:
    """Back the (unchanged) source up once with restic and borg into template repositories."""
    templates = Templates(root / "restic", root / "borg", root / "borg-base")
    restic_init(templates.restic)
    run_quiet(_restic_argv(templates.restic, places.source), RESTIC_ENV)
    borg_init(templates.borg_repo, templates.borg_base)
    run_quiet(
        _borg_argv(templates.borg_repo, places.source),
        {**BORG_ENV, "BORG_BASE_DIR": str(templates.borg_base)},
    )
    return templates


def restic_incremental(places: Places, templates: Templates) -> Contender:
    repo = places.dest("restic-incr")
    _, template_size = tree_size(templates.restic)
    return Contender(
        name="restic backup (incremental)",
        argv=lambda: _restic_argv(repo, places.source),
        prepare=lambda: copy_tree(templates.restic, repo),
        collect=_grown(repo, lambda: template_size),
        env=RESTIC_ENV,
    )


def borg_incremental(places: Places, templates: Templates) -> Contender:
    repo, base = places.dest("borg-incr"), places.dest("borg-incr-base")
    _, template_size = tree_size(templates.borg_repo)

    def prepare() -> None:
        copy_tree(templates.borg_repo, repo)
        copy_tree(templates.borg_base, base)

    return Contender(
        name="borg create (incremental)",
        argv=lambda: _borg_argv(repo, places.source),
        prepare=prepare,
        collect=_grown(repo, lambda: template_size),
        env={**BORG_ENV, "BORG_BASE_DIR": str(base)},
    )
