"""``python -m knnlm`` runs the CLI."""

from knnlm.cli import main

main()
