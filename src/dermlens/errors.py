"""Every error dermlens raises on purpose: one base, `DermlensError`, and one subclass per kind of failure.

The CLI prints any `DermlensError` as one line (`error: ...`, exit 2) and the API turns it into a short JSON
body; any other exception is a bug and shows as one. Each subclass also keeps the built-in type it refines
(ValueError, FileNotFoundError, ...), so code that catches the built-in keeps working.
"""

from __future__ import annotations


class DermlensError(Exception):
    """Base of every expected dermlens failure: bad input, a missing file, an unusable setting."""


# ---- configuration and optional dependencies -------------------------------------------------------
class ConfigError(DermlensError, ValueError):
    """A configuration file or override that cannot be used (one-line message)."""


class UsageError(DermlensError, ValueError):
    """Command-line options that cannot work together (one-line message)."""


class MissingExtra(DermlensError, ModuleNotFoundError):
    """An optional dependency is not installed (one-line message naming the extra to install)."""


# ---- data ------------------------------------------------------------------------------------------
class DataError(DermlensError):
    """An expected problem with the user's data or arguments; the CLI prints it without a traceback."""


class ValidationFailed(DermlensError):
    """Validation failed under on_error 'fail', or no usable row is left after skipping bad ones."""


class FetchError(DataError):
    """The download could not run or failed; the message is one line."""


class UnknownLabelError(DermlensError, ValueError):
    """A diagnosis label that the taxonomy cannot map."""


class ImageDecodeError(DermlensError, ValueError):
    """An input that cannot be decoded as an image (names the source); `code`/`reason`: our own words."""

    code: str = "corrupt_image"
    reason: str = "corrupt or truncated image"


class DicomError(ImageDecodeError):
    """A DICOM file dermlens cannot use as a photograph (names the file); `code` as ImageDecodeError's."""

    code: str = "unsupported_format"
    reason: str = "not a usable DICOM photograph"


# ---- model bundles -----------------------------------------------------------------------------------
class BundleError(DermlensError, FileNotFoundError):
    """A model bundle that is missing, incomplete or fails its integrity check (names the path)."""


class MissingReference(BundleError):
    """The bundle has no usable monitoring reference (one-line message)."""


# ---- training, export, fitting -----------------------------------------------------------------------
class WeightsError(DermlensError, RuntimeError):
    """Weights that cannot be found or do not fit the architecture (message names the cause)."""


class DataSetupError(DermlensError, FileNotFoundError):
    """Prepared data that is missing or inconsistent (one-line message)."""


class FoldError(DermlensError, ValueError):
    """A fold request the prepared manifest cannot satisfy (one-line message)."""


class EnsembleError(DermlensError, RuntimeError):
    """An ensemble recipe or member set that cannot be used (one-line message)."""


class DistillError(DermlensError, RuntimeError):
    """A teacher or teacher-logit file that cannot be used (one-line message)."""


class ExportError(DermlensError, RuntimeError):
    """A checkpoint, run folder or prepared data set that cannot be exported (one-line message)."""


class RefitError(DermlensError, ValueError):
    """Inputs that cannot be used for fitting (message names them)."""


class OperatingPointError(DermlensError, ValueError):
    """A refer rate that cannot be used, or a bundle without the table that maps it (one line)."""


# ---- evaluation and prediction -------------------------------------------------------------------------
class EvaluationInputError(DermlensError, ValueError):
    """Inputs that cannot be evaluated together (message says why)."""


class PredictionFileError(DermlensError, ValueError):
    """A truth or prediction file that cannot be evaluated; the message says which file and why."""


class BatchInputError(DermlensError, ValueError):
    """Inputs of a folder prediction that cannot be used at all (no images found, unreadable CSV)."""


class RayUnavailable(DermlensError, RuntimeError):
    """Ray is not installed or the cluster cannot be reached (one-line message)."""


# ---- the service and its records -------------------------------------------------------------------------
class InputError(DermlensError, ValueError):
    """A metadata value that is not accepted; `code` is the API's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class QueueFull(DermlensError, RuntimeError):
    """The batch queue is full: the server is saturated."""


class RecordsConfigError(DermlensError, RuntimeError):
    """The records database cannot be used at all (bad URL, missing driver, unreachable); one line."""


class RecordsUnavailable(DermlensError, RuntimeError):
    """A write could not be committed now (database locked, hung or unreachable); try again later."""


class OutcomeError(DermlensError, ValueError):
    """A confirmed diagnosis that cannot be attached (bad value, unknown record); one line."""


class UnknownRecord(OutcomeError, LookupError):
    """No stored prediction has this record id (or image SHA-256)."""


# ---- PACS (DICOMweb) -----------------------------------------------------------------------------------
class PacsError(DermlensError, RuntimeError):
    """A DICOMweb request the PACS refused or did not answer (one line naming the request)."""
