"""User-facing errors: one line that says what to fix, never a traceback."""


class UserError(Exception):
  """A problem with the user's input (config, paths, data) that they can fix.

  `stt_jax.main` prints `error: <message>` and exits with status 2.
  """
