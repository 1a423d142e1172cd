"""User-facing errors.

Every error the core raises on bad input is a ``DarkroomError`` whose message is one clear sentence naming
the file, field or value and what would be valid. Front ends print ``str(err)`` and never a traceback.
"""

from __future__ import annotations


class DarkroomError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing message."""


class CheckpointError(DarkroomError):
    """A model file cannot be used (not a checkpoint, truncated, wrong keys, unsupported family)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class RequestError(DarkroomError):
    """A generation request has an invalid field."""

    def __init__(self, field: str, value: object, valid: str) -> None:
        self.field = field
        self.value = value
        self.valid = valid
        super().__init__(f"{field} = {value!r} is invalid: {valid}")

    @property
    def errors(self) -> list[RequestError]:
        """Every invalid field this error reports (one here; several for ``RequestErrors``)."""
        return [self]

    @staticmethod
    def combine(errors: list[RequestError]) -> RequestError:
        """One error for several: the error itself when there is one, else a ``RequestErrors``."""
        flat = [one for error in errors for one in error.errors]
        if not flat:
            raise ValueError("combine() needs at least one error")
        return flat[0] if len(flat) == 1 else RequestErrors(flat)


class RequestErrors(RequestError):
    """Several invalid fields of one request, all reported at once: ``str()`` is one line per field.

    ``field``, ``value`` and ``valid`` are those of the first, so code written for one ``RequestError`` works.
    """

    def __init__(self, errors: list[RequestError]) -> None:
        self._errors = [one for error in errors for one in error.errors]
        first = self._errors[0]
        self.field, self.value, self.valid = first.field, first.value, first.valid
        Exception.__init__(self, "\n".join(str(error) for error in self._errors))

    @property
    def errors(self) -> list[RequestError]:
        return list(self._errors)


class PresetError(DarkroomError):
    """A preset file is malformed."""


class ModelNotFoundError(DarkroomError):
    """A model named in a request is not in any models folder."""
