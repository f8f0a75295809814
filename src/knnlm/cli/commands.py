"""The list of CLI command modules, in the order their commands appear in ``--help``."""

from knnlm.cli import (
    engine,
    fast,
    generate,
    hurdle,
    macondo_data,
    macondo_run,
    memory,
    project,
    reproduce,
    train,
)

MODULES: list = [
    reproduce,
    train,
    engine,
    fast,
    generate,
    project,
    macondo_data,
    macondo_run,
    memory,
    hurdle,
]
