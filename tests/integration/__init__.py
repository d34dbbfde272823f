"""Integration tests: training runs, several processes, the export and evaluate commands, steps
on 8-device meshes. Each module is marked `integration` (tests/conftest.py checks it)."""
