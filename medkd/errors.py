"""Errors that the CLI turns into one-line messages and exit code 1."""


class MedkdError(Exception):
    """A user-facing failure: bad input, a missing file, a failed run.

    The message must be one line naming the file or case and the reason.
    """


class DataError(MedkdError):
    """A case or file could not be read or failed an integrity check."""


class TrainingError(MedkdError):
    """Training stopped: NaN/inf loss, a dead loss term, and so on."""


class OutputError(MedkdError):
    """An output could not be written (disk full, file too large, I/O error, permission, read-only file system).

    Never a bad *input*: preprocess and predict stop at once instead of blaming the case being processed, and
    ``--skip-bad`` does not turn it into success. The message names the output path and the OS reason.
    """


class ModelError(MedkdError):
    """The model, not the input, is at fault: e.g. an exported graph whose output is not the ``(B, K, H, W)`` logits
    medkd expects. Like :class:`OutputError` it stops ``predict`` at once instead of blaming the case."""
