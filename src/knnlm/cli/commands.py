"""The list of CLI command modules, in the order their commands appear in ``--help``."""

from knnlm.cli import engine, macondo_data

MODULES: list = [engine, macondo_data]
