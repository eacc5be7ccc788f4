"""dermgraph's command line (the top layer): ``dermgraph ...`` or ``python -m dermgraph ...``.

The library lives in the packages below it: ``agent`` (the graph, ``Agent``), ``evals``, ``training``,
``retrieval`` and ``models`` (with the vocabulary); see ARCHITECTURE.md.
"""
