"""The one exception type for input the user gave us that we cannot use.

`jaxvid.cli` turns a `UserError` into one line on stderr and exit status 2 (no traceback
unless --verbose). Its message names the problem and says what to do.
"""


class UserError(Exception):
  """Bad input: a config key, a file, a prompt, a workdir. The message is shown as is."""
