"""The error a bad option value raises, everywhere in the package (no Lightning needed).

:class:`OptionError` is a ``ValueError`` that knows the option, the value and what is
accepted, and suggests the closest accepted value; the command line prints it as one short
message instead of a traceback.

Example::

    >>> raise OptionError("table", "fited", ("fitted", "paper"))
    Traceback (most recent call last):
    ...
    lightning_approxbp.errors.OptionError: table='fited' is not accepted; use one of 'fitted', 'paper'. Did you mean 'fitted'?
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any


def closest(value: Any, accepted: Sequence[Any]) -> Any | None:
    """The accepted value whose spelling is closest to ``value``, if any is close."""
    spelled = {str(candidate): candidate for candidate in accepted}
    match = difflib.get_close_matches(str(value), list(spelled), n=1, cutoff=0.6)
    return spelled[match[0]] if match else None


class OptionError(ValueError):
    """``option=value`` is not accepted.

    Its message is one line of a fixed form (:data:`OptionError.LINE` finds it), so that it can
    still be found where another library reports it inside its own error text.

    Args:
        option: the option's name, as the user writes it (keyword or YAML key).
        value: the value given.
        accepted: the accepted values (shown with ``repr``).
        extra: more accepted forms, in words (e.g. ``"or a StepTable"``).
        hint: a sentence that says what to do, in place of the generic suggestion.
        spellings: the values to suggest from, when they are more than ``accepted`` (aliases).
    """

    def __init__(self, option: str, value: Any, accepted: Sequence[Any], *, extra: str = "",
                 hint: str = "", spellings: Sequence[Any] = ()) -> None:
        self.option, self.value, self.accepted = option, value, tuple(accepted)
        listed = ", ".join(repr(choice) for choice in self.accepted)
        message = f"{option}={value!r} is not accepted; use one of {listed}{' ' + extra if extra else ''}."
        suggestion = closest(value, (*self.accepted, *spellings)) if isinstance(value, str) else None
        if hint:
            message += f" {hint}"
        elif suggestion is not None:
            message += f" Did you mean {suggestion!r}?"
        super().__init__(message)

    LINE = re.compile(r"\b\w+=.+? is not accepted; use one of .*")

    @classmethod
    def find(cls, error: BaseException | None) -> str | None:
        """The message of the :class:`OptionError` behind ``error``: one in its chain of causes, or
        one quoted in the text of one of them; ``None`` if there is none."""
        seen: set[int] = set()
        chain = []
        while error is not None and id(error) not in seen:
            if isinstance(error, cls):
                return str(error)
            seen.add(id(error))
            chain.append(error)
            error = error.__cause__ or error.__context__
        for link in chain:
            quoted = cls.LINE.search(str(link))
            if quoted:
                return quoted.group(0)
        return None


class ProbeError(ValueError):
    """The batch given to trace and verify a conversion did not run through the model.

    Raised from the model's own error (chained as ``__cause__``); the model is unchanged.
    """

    def __init__(self, label: str, error: BaseException) -> None:
        first_line = (str(error).strip().splitlines() or [""])[0]
        if len(first_line) > 160:
            first_line = first_line[:157] + "..."
        super().__init__(
            f"ApproxBP: the probe batch ({label}) did not run through the model, which was left unchanged: "
            f"{type(error).__name__}: {first_line}\n"
            "The conversion runs the model once on it to trace and verify what it changes. Pass one batch the way "
            "the model's forward takes it: a tensor, a tuple of positional arguments or a dict of keyword arguments "
            "(e.g. {'input_ids': ids}), with the shapes and dtypes of your training data."
        )
