"""What the tests import: the parity and resume harnesses, the worker functions that
meshplan.testing.spawn runs (workers import them by name), and the conformance matrix.

Scripts that tests or people launch as processes (accelerate launch, torchrun, python) live in
tests/scripts/ and put tests/ on sys.path to import these modules.
"""
