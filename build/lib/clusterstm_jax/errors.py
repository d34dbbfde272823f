"""User-facing errors: the entry points print these as one line (no traceback) and exit 1."""


class UserError(ValueError):
  """Bad input the user can fix: a config value, a missing path, an unbuilt dataset."""
