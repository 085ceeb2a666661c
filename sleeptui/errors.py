"""One hierarchy for errors a user can act on; the CLI and the app render them."""


class SleeptuiError(Exception):
    """Base class: the message is written for the user and says what to do."""


class ModelNotFound(SleeptuiError):
    """A preset or path did not resolve to model weights on this machine."""


class NotAFact(SleeptuiError):
    """A statement the engine cannot store (question, hypothetical, negation, no subject)."""


class StateError(SleeptuiError):
    """The state folder cannot be read or written as asked; nothing was changed."""


class StateLocked(StateError):
    """Another sleeptui process holds the state folder."""


class FingerprintMismatch(StateError):
    """The state folder belongs to another model."""


class UnknownMemory(SleeptuiError):
    """No memory matches the id or subject given."""
