"""Shared fixtures: explicit random generators (never the global seed)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def rng() -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(1234)
