"""``python -m dermgraph``: the ``dermgraph`` command."""

from dermgraph.cli import main

main()
