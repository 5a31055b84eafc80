"""The errors peftkit raises: each names what was wrong and what to do about it."""


class PeftkitError(Exception):
    """Base class: every error peftkit raises on bad input derives from this."""


class ConfigError(PeftkitError, ValueError):
    """A recipe or config value is unknown, misspelt, or of the wrong type."""


class TargetError(PeftkitError, ValueError):
    """A target-module selection matched nothing, or matched something unusable."""


class ModelNotFoundError(PeftkitError, FileNotFoundError):
    """A model name is neither bundled, nor a local folder, nor reachable on the hub."""


class DataError(PeftkitError, ValueError):
    """A dataset file is missing, unreadable, or lacks a needed column."""


class AdapterError(PeftkitError, ValueError):
    """An adapter folder is missing, malformed, or does not fit the base model."""


class ExportError(PeftkitError, ValueError):
    """A model cannot be exported as asked (its architecture, tokenizer, method or output path)."""


class OutputError(PeftkitError, OSError):
    """A run's files could not be written: the disk is full, read-only, or another file system."""


class MalformedPairError(DataError):
    """A preference row cannot be learnt from: no chosen or rejected response, chosen equal to
    rejected, or an empty prompt. Raised, naming the rows, before anything is written."""


class MalformedExampleError(DataError):
    """A kto or grpo row cannot be learnt from: an empty prompt or completion, a label that is
    not true or false. Raised, naming the rows, before anything is written."""


class RewardError(PeftkitError, ValueError):
    """A GRPO reward function is unknown, cannot be imported, raised, or returned something
    other than one number per completion."""
