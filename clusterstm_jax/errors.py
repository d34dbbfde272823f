"""User-facing errors: the entry points print these as one line (no traceback) and exit 1."""


class UserError(ValueError):
  """Bad input the user can fix: a config value, a missing path, an unbuilt dataset."""


# The exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL):
# "run the same command again to resume" (launch/watch.sh does).
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """A run stopped on a signal after saving what it had; the entry points exit EXIT_PREEMPTED."""
