"""Engine errors. Their messages are shown to users, so they say what to fix."""


class EngineError(Exception):
    """Base class: a problem with the user's input or job, not a bug in the service."""


class SpecError(EngineError):
    """An architecture, input or job spec that cannot work."""


class ModelLoadError(EngineError):
    """A weights file that does not load, or does not match its architecture spec."""


class DataError(EngineError):
    """A dataset that cannot be read, is unsafe, or does not fit the model's input."""


class Canceled(EngineError):
    """Raised from a progress callback to stop training between steps."""


class Interrupted(Exception):
    """Raised from a progress callback to stop between steps after a checkpoint is taken.

    Not an EngineError: nothing is wrong with the job (the worker is shutting down, a time limit
    was reached); it resumes from that checkpoint.
    """
