"""Code the example scripts share: datasets, splits, models, figures and the command line.

The scripts run as `python examples/NAME.py`, which puts `examples/` on the import path,
so they import these modules as `from ih_examples import datasets`.
"""
