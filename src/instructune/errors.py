"""Errors caused by the user's input or environment.

The CLI prints these as one clear message, without a traceback. Library code raises a
subclass whose message names the file, the record and the field (or the model and what to do).
"""


class InstructuneError(Exception):
    """Base class for errors a user can fix (bad data, missing files, no network)."""


class DataError(InstructuneError, ValueError):
    """Bad instruction data: the message names the file, the record and the field."""


class ModelLoadError(InstructuneError):
    """A model or tokenizer could not be found or loaded; the message says what to do."""


class OfflineError(InstructuneError):
    """Something must be downloaded, but the network is unreachable and nothing is cached."""


class StorageError(InstructuneError):
    """A file could not be written because its disk is full; the message names the folder, the
    space free, and what was kept."""
