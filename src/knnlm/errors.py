"""One exception type for every error a user can cause.

The CLI turns a ``KnnlmError`` into one clear line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class KnnlmError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    Example::

        try:
            Datastore.load("no/such/folder")
        except KnnlmError as exc:
            print(exc)  # no datastore at no/such/folder (meta.json missing)
    """
