"""The one error type users see for bad input."""


class InputError(ValueError):
  """Bad input: the message is one line naming the file (or value) and the problem.

  The CLI prints it as ``megan: error: <message>`` and exits with status 2,
  without a traceback. Library functions raise it for anything a user can fix.
  """
