"""The list of CLI command modules, in the order their commands appear in ``--help``."""

from knnlm.cli import (
    datastore_eval,
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
    datastore_eval,
    fast,
    generate,
    project,
    macondo_data,
    macondo_run,
    memory,
    hurdle,
]
