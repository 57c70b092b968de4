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


def check_keys(mapping: dict, where: str, allowed: set[str] | frozenset[str], required: set[str] | frozenset[str]) -> None:
    """Raise :class:`KLIPMedError` for keys outside ``allowed`` or a missing ``required`` key.

    Args:
        mapping: a parsed JSON object (config, manifest, manifest item).
        where: what it is, for the message (file and position).
    """
    unknown = set(mapping) - set(allowed)
    if unknown:
        raise KLIPMedError(f"{where}: expected keys among {sorted(allowed)}, found unknown {sorted(unknown)}")
    missing = set(required) - set(mapping)
    if missing:
        raise KLIPMedError(f"{where}: expected keys {sorted(required)}, missing {sorted(missing)}")
