"""The one exception type klip_med raises for bad input.

Every message names the argument or file at fault, what was expected and what was found,
so a user can fix the call without reading our source.
"""

from __future__ import annotations


class KLIPMedError(ValueError):
    """Bad input to klip_med: a wrong argument, shape, file or value.

    Subclasses ``ValueError`` so generic ``except ValueError`` handlers still work.
    """


def expect(condition: bool, argument: str, expected: str, found: object) -> None:
    """Raise :class:`KLIPMedError` unless ``condition`` holds.

    Args:
        condition: the rule that must hold.
        argument: name of the argument / file / attribute at fault.
        expected: what was expected, in words.
        found: what was received (formatted with ``repr`` when not a string).
    """
    if not condition:
        shown = found if isinstance(found, str) else repr(found)
        raise KLIPMedError(f"{argument}: expected {expected}, found {shown}")
