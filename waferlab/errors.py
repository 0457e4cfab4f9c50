"""The single exception type users see; the CLI prints it as one line and exits with code 2."""


class WaferlabError(Exception):
    """A user-actionable error: bad input, bad configuration, a missing file.

    The message must name what is wrong and where (file, row, field) in one line.
    """
