"""What the command files share."""
from __future__ import annotations

import typer


def given_on_command_line(ctx: typer.Context, names) -> dict:
    """The options among ``names`` that were typed on the command line (not defaults), with their
    values. Compared by name: typer ships its own copy of click, whose ``ParameterSource`` is
    another class than ``click.core.ParameterSource``."""
    out = {}
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            out[name] = ctx.params[name]
    return out
