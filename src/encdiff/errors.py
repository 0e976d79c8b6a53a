"""The one exception type for user mistakes (bad config, file, key or argument).

Its message names the thing at fault; the CLI prints it as one line and exits with status 2.
"""


class EncdiffError(ValueError):
    """A user mistake: the message says which file, key, field or value is wrong."""
