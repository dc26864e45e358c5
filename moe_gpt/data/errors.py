"""The one exception type the data pipeline raises for bad input or a missing setup step."""


class DataError(Exception):
    """A problem with the user's data settings or files.

    The message is one line that names what is wrong and what to do, so a caller
    (``train.py``) can print it without a traceback.
    """
