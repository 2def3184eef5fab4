"""vtrio's benchmarks: vtrio and the design it replaces, measured side by side in one run.

``nox -s bench`` (or ``python -m benchmarks``); ``--help`` lists the options. See README.md.
"""
