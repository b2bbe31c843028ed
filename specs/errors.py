"""Error and warning types shared by the spec loader and the compiler.

`UpcycleError` is the one base class a caller catches for "the user asked for something we cannot
do" (bad spec, model that does not fit the spec, ...), as opposed to bugs. `SpecError` is also a
`ValueError`, so code that only knows the standard library still catches it sensibly.
Every message renders as ONE line, `file:line: field: what is wrong`, so it reads well in a
terminal, a log, or an editor's quickfix list.
"""

from __future__ import annotations

import reprlib

__all__ = ["UpcycleError", "SpecError", "SpecWarning", "show_value"]


class UpcycleError(Exception):
    """Base class of the errors the upcycle compiler reports to its user."""


def _location(file: str | None, line: int | None, column: int | None) -> str:
    loc = file or "<spec>"
    if not loc.isprintable():  # a path with a newline in it must not break the one-line rule
        loc = repr(loc)
    if line is not None:
        loc += f":{line}"
        if column is not None:
            loc += f":{column}"
    return loc


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class SpecError(UpcycleError, ValueError):
    """A spec that cannot be used, with where (file, 1-based line, dotted field) and why."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ):
        self.message = _one_line(message)
        self.file = file
        self.field = field
        self.line = line
        self.column = column
        super().__init__(str(self))

    @classmethod
    def all_of(cls, errors: list["SpecError"]) -> "SpecError":
        """One error for several (sorted by line): the first's location, every one on its own line."""
        errors = sorted(errors, key=lambda e: (e.line is None, e.line or 0))
        if len(errors) == 1:
            return errors[0]
        first = errors[0]
        err = cls(first.message, file=first.file, field=first.field, line=first.line, column=first.column)
        err.errors = errors
        err.args = (str(err),)
        return err

    def __str__(self) -> str:
        many = getattr(self, "errors", None)
        if many:
            return f"{len(many)} errors in the spec:\n" + "\n".join(f"  {e}" for e in many)
        parts = [] if self.file is None and self.line is None else [_location(self.file, self.line, self.column)]
        if self.field:
            parts.append(_one_line(self.field))
        parts.append(self.message)
        return ": ".join(parts)

    def __reduce__(self):  # keyword-only fields: keep the error picklable (multiprocessing, pytest-xdist)
        kwargs = dict(file=self.file, field=self.field, line=self.line, column=self.column)
        return (_rebuild_spec_error, (self.message, kwargs))


def _rebuild_spec_error(message: str, kwargs: dict) -> SpecError:
    return SpecError(message, **kwargs)


class SpecWarning(UserWarning):
    """A spec that works but probably does not do what its author expects."""


_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlevel = 3
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 6


def show_value(value) -> str:
    """A short, single-line, YAML-flavoured rendering of a user value for messages.

    Bounded (reprlib) because the value can be anything YAML builds, including huge or
    self-referencing structures made with anchors.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return _one_line(_repr.repr(value))
