"""Optional packages behind one import helper that names the extra to install.

    ray = require("ray", extra="ray", argument="--engine ray")

The core install never imports them: ``import klip_med`` and ``klip-med run`` work without Ray.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from klip_med.errors import KLIPMedError


def require(module: str, *, extra: str, argument: str) -> ModuleType:
    """Import ``module`` or raise one :class:`KLIPMedError` naming ``argument`` and the pip extra.

    Args:
        module: the import name, e.g. ``"ray"``.
        extra: the klip-med extra that installs it, e.g. ``"ray"`` (``pip install 'klip-med[ray]'``).
        argument: what asked for it, for the message, e.g. ``"--engine ray"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise KLIPMedError(
            f"{argument}: expected the optional package {module!r} (install it with "
            f"pip install 'klip-med[{extra}]'), found it missing ({exc})"
        ) from None
