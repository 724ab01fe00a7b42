"""The exceptions qdetr raises for bad input, in one place.

Every error that a user can cause (a wrong argument, an unreadable or crafted file, a bad
download, a malformed COCO file, an image that cannot be used, an output that would replace a
file) is a :class:`QdetrError`. Each also subclasses the built-in type that callers
traditionally catch (``ValueError``, ``FileExistsError``, ``RuntimeError``,
``pickle.UnpicklingError``), so ``except ValueError`` keeps working. The command line maps every
:class:`QdetrError` to one line on stderr and exit code 2.

This module imports nothing from qdetr, so every package may use it.

Hierarchy::

    QdetrError(Exception)
    ├── ConfigError(ValueError)            bad argument or configuration value
    │   └── ResumeMismatchError            resuming a run with changed settings
    ├── CheckpointError(ValueError)        unreadable, crafted or non-finite weights file
    │   └── UnsafeCheckpointError(pickle.UnpicklingError)
    ├── DataError(ValueError)              malformed dataset / annotation file
    ├── InputImageError(ValueError)        an image or pixel tensor that cannot be used
    ├── OutputExistsError(FileExistsError) an output that would replace an existing file
    ├── DownloadError(RuntimeError)        failed, truncated or refused transfer
    │   ├── ChecksumError
    │   └── HTMLResponseError
    └── OfflineModeError(RuntimeError)     network needed while offline mode is on

Examples:
    >>> from qdetr.errors import CheckpointError, QdetrError
    >>> issubclass(CheckpointError, QdetrError), issubclass(CheckpointError, ValueError)
    (True, True)
"""

from __future__ import annotations

import pickle

__all__ = [
    "QdetrError",
    "ConfigError",
    "ResumeMismatchError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "DataError",
    "InputImageError",
    "OutputExistsError",
    "DownloadError",
    "ChecksumError",
    "HTMLResponseError",
    "OfflineModeError",
]


class QdetrError(Exception):
    """Base class of every error qdetr raises for a bad input; the message says what to do.

    Examples:
        >>> try:
        ...     raise ConfigError("bits must be 2, 3 or 4, got 5")
        ... except QdetrError as err:
        ...     print(type(err).__name__, err)
        ConfigError bits must be 2, 3 or 4, got 5
    """


class ConfigError(QdetrError, ValueError):
    """An argument or configuration value is out of range, of the wrong type, or inconsistent.

    A subclass of ``ValueError``.

    Examples:
        >>> issubclass(ConfigError, ValueError)
        True
    """


class ResumeMismatchError(ConfigError):
    """Resuming a run whose settings differ from the saved ones; the message lists the changed fields.

    Examples:
        >>> err = ResumeMismatchError("resume changes lr: 0.0001 -> 0.001")
        >>> isinstance(err, ConfigError), isinstance(err, ValueError)
        (True, True)
    """


class CheckpointError(QdetrError, ValueError):
    """A weights file or model folder is empty, truncated, crafted, or holds non-finite values.

    A subclass of ``ValueError``.

    Examples:
        >>> try:
        ...     raise CheckpointError("weights.pth is empty (0 bytes); delete it and download it again")
        ... except ValueError as err:
        ...     print("delete it" in str(err))
        True
    """


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint needs a global outside the allow-list; it was not loaded.

    A subclass of :class:`CheckpointError` and of ``pickle.UnpicklingError``.

    Examples:
        >>> import pickle
        >>> issubclass(UnsafeCheckpointError, pickle.UnpicklingError), issubclass(UnsafeCheckpointError, ValueError)
        (True, True)
    """


class DataError(QdetrError, ValueError):
    """A dataset or annotation file is malformed; the message names the file and the record.

    A subclass of ``ValueError``.

    Examples:
        >>> issubclass(DataError, ValueError)
        True
    """


class InputImageError(QdetrError, ValueError):
    """An image file or pixel tensor cannot be used (unreadable, empty, NaN, out of range).

    A subclass of ``ValueError``.

    Examples:
        >>> issubclass(InputImageError, ValueError)
        True
    """


class OutputExistsError(QdetrError, FileExistsError):
    """Writing an output would replace an input or an earlier output; nothing was written.

    A subclass of ``FileExistsError``.

    Examples:
        >>> issubclass(OutputExistsError, FileExistsError)
        True
    """


class DownloadError(QdetrError, RuntimeError):
    """A download failed (network error, truncated transfer, wrong size, refused URL).

    The base class of :class:`ChecksumError` and :class:`HTMLResponseError`. A subclass of
    ``RuntimeError``.

    Examples:
        >>> issubclass(ChecksumError, DownloadError), issubclass(HTMLResponseError, DownloadError)
        (True, True)
    """


class ChecksumError(DownloadError):
    """The downloaded or cached bytes do not have the expected SHA-256.

    Examples:
        >>> issubclass(ChecksumError, RuntimeError)
        True
    """


class HTMLResponseError(DownloadError):
    """The server answered with an HTML page instead of the requested file; nothing was saved.

    Examples:
        >>> issubclass(HTMLResponseError, DownloadError)
        True
    """


class OfflineModeError(QdetrError, RuntimeError):
    """A file is needed from the network while offline mode is on.

    A subclass of ``RuntimeError``.

    Examples:
        >>> issubclass(OfflineModeError, RuntimeError)
        True
    """
