"""Typer groups with a default command: ``siterecovery failover VM …`` runs ``failover run``,
``siterecovery job ID`` runs ``job show``."""

from __future__ import annotations

from typer._click.core import Context as ClickContext  # typer 0.29 vendors click
from typer.core import TyperGroup


def default_command_group(command: str) -> type[TyperGroup]:
    """A group class whose unknown first word (an argument or an option) goes to ``command``."""

    class DefaultCommandGroup(TyperGroup):
        def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
            if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
                args = [command, *args]
            return super().parse_args(ctx, args)

    return DefaultCommandGroup
