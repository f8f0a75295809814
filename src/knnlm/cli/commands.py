"""The CLI's command modules and groups, and the Typer app built from them.

Each command module declares ``COMMANDS``: ``(name, function)`` pairs, where the name is
``"eval"`` for a top-level command or ``"datastore build"`` for one in a group. The groups and
their help are declared here only; ``--help`` lists commands in ``MODULES`` order, then groups.
"""

from __future__ import annotations

import typer

from knnlm.cli import (
    Command,
    Group,
    datastore_eval,
    fast,
    generate,
    hurdle,
    inspect,
    macondo_data,
    macondo_run,
    memory,
    project,
    reproduce,
    train,
    tune,
)

# Group name -> its help, in the order the groups appear in ``knnlm --help``.
GROUPS = {
    "datastore": "Build, index and describe a kNN datastore.",
    "gate": "Adaptive retrieval: a gate that decides which tokens search.",
    "macondo": "The Macondo over-specification dataset and experiments (paper Section 4).",
    "memory": "Train an MLP memory on a datastore's (key, next token) pairs (Section 5).",
}

MODULES: list = [
    reproduce,
    train,
    datastore_eval,
    fast,
    tune,
    generate,
    project,
    macondo_data,
    macondo_run,
    memory,
    hurdle,
    inspect,
]


def register(app: typer.Typer, modules: list | None = None) -> None:
    """Add the commands of ``modules``' (default: :data:`MODULES`) ``COMMANDS`` tables to
    ``app``, grouped commands under a fresh sub-app per group; a name declared twice is an
    error."""
    modules = MODULES if modules is None else modules
    seen: set[str] = set()
    groups: dict[str, typer.Typer] = {}
    for module in modules:
        for name, function in module.COMMANDS:
            if name in seen:
                raise ValueError(f"CLI command {name!r} is declared twice")
            seen.add(name)
            group, _, command = name.rpartition(" ")
            if group and group not in groups:
                groups[group] = typer.Typer(cls=Group, help=GROUPS[group], no_args_is_help=True)
            (groups[group] if group else app).command(command, cls=Command)(function)
    for group in GROUPS:
        if group in groups:
            app.add_typer(groups[group], name=group)
