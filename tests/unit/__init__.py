"""Unit tests: pure functions, single modules, the compile of a step at most; no training run.
Each module is marked `unit` (tests/conftest.py checks it)."""
