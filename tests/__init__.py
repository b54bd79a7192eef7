"""The test suite. A package only so that `tests.helpers` is importable (pyproject: pytest `pythonpath`)."""
