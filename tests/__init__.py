"""The test suite: unit/ (fast, no training run) and integration/ (runs, processes, CLIs)."""
