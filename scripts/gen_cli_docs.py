"""Write docs/cli.md from the command tree, so the reference never drifts from the code.

    .venv/bin/python scripts/gen_cli_docs.py          # rewrite docs/cli.md
    .venv/bin/python scripts/gen_cli_docs.py --check  # exit 1 if docs/cli.md is stale

tests/cli/test_docs.py runs the check.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer.main

from siterecovery.cli.app import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

HEADER = """# siterecovery command reference

Generated from the code by `scripts/gen_cli_docs.py`; do not edit by hand.

Every command accepts the global option `--workdir/-w DIR` (or `SITERECOVERY_WORKDIR`): the
work directory of the embedded vault and replica store. List commands accept `--json`, which
prints exactly one JSON document on stdout. Exit codes: 0 success, 1 failure (e.g. the demo's
verification failed), 2 bad input, 3 not found, 4 replica store, 5 hypervisor, 6 vault,
7 replication or recovery. Errors print `error: …` and a `hint: …` on stderr.
"""


# Typer vendors its own copy of click, so commands are recognised by shape, not by class.


def _is_argument(param: Any) -> bool:
    return bool(param.param_type_name == "argument")


def _arg_name(param: Any) -> str:
    return str(param.metavar or param.name).upper()


def _params(command: Any) -> list[str]:
    lines = []
    for param in command.params:
        if _is_argument(param):
            lines.append(f"- `{_arg_name(param)}` (argument): {(param.help or '').strip()}")
            continue
        if param.param_type_name != "option" or param.hidden:
            continue
        names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        helptext = (param.help or "").strip()
        default = param.default
        if default not in (None, False, (), "") and not callable(default):
            helptext += f" Default: `{default}`."
        lines.append(f"- {names}: {helptext}".rstrip())
    return lines


def _walk(command: Any, path: list[str]) -> list[str]:
    out: list[str] = []
    if hasattr(command, "commands"):
        for name in sorted(command.commands):
            out += _walk(command.commands[name], [*path, name])
        return out
    usage = " ".join(path)
    args = " ".join(_arg_name(p) for p in command.params if _is_argument(p))
    out.append(f"## `siterecovery {usage}{' ' + args if args else ''}`\n")
    out.append((command.help or "").strip() + "\n")
    params = _params(command)
    if params:
        out.append("\n".join(params) + "\n")
    return out


def render() -> str:
    root = typer.main.get_command(app)
    return HEADER + "\n" + "\n".join(_walk(root, [])).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print("docs/cli.md is stale: run .venv/bin/python scripts/gen_cli_docs.py")
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
