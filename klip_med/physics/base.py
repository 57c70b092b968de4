"""Shared behaviour of klip_med operators: expected shapes, shape checks, ``describe()``.

Mixed into ``deepinv.physics.LinearPhysics`` subclasses (CT and MRI); it holds no tensors.
"""

from __future__ import annotations

import torch

from klip_med.errors import KLIPMedError, expect
from klip_med.physics.noise import describe_noise


def _shape_text(batch: str | int, shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in (batch, *shape)) + ")"


class KLIPPhysicsMixin:
    """Image/measurement shape contract and metadata for a klip_med operator.

    Attributes (set by :meth:`_setup_contract`):
        kind: short name, e.g. ``"ct-sparse"`` or ``"mri"``.
        image_shape: per-sample image shape ``(1, H, W)``; images are ``(B, 1, H, W)`` real floats.
        measurement_shape: per-sample measurement shape, e.g. ``(1, detectors, views)`` for CT,
            ``(2, H, W)`` (real, imag) for single-coil MRI, ``(2, coils, H, W)`` for multi-coil.
        parameters: JSON-ready construction parameters.
    """

    kind: str
    image_shape: tuple[int, int, int]
    measurement_shape: tuple[int, ...]
    parameters: dict

    def _setup_contract(self, kind: str, height: int, width: int, parameters: dict) -> None:
        self.kind = kind
        self.image_shape = (1, int(height), int(width))
        self.parameters = dict(parameters)
        probe = torch.zeros((1, *self.image_shape), dtype=self._image_dtype(), device=self._buffer_device())
        with torch.no_grad():
            self.measurement_shape = tuple(self.A(probe).shape[1:])

    def _image_dtype(self) -> torch.dtype:
        return torch.float32

    def _buffer_device(self) -> torch.device:
        return self._device_holder.device

    def check_image(self, x: torch.Tensor) -> None:
        """Raise :class:`KLIPMedError` unless ``x`` is a real tensor of shape ``(B, *image_shape)``."""
        expected = f"image of shape {_shape_text('B', self.image_shape)}"
        argument = f"physics {self.kind}"
        expect(isinstance(x, torch.Tensor), argument, f"{expected} (a torch.Tensor)", type(x).__name__)
        expect(x.dim() == 4 and tuple(x.shape[1:]) == self.image_shape, argument, expected, tuple(x.shape))
        expect(
            x.is_floating_point(),
            argument,
            f"{expected} with a real floating dtype",
            str(x.dtype),
        )
        required = self._required_dtype()
        if required is not None:
            expect(x.dtype == required, argument, f"{expected} with dtype {required}", str(x.dtype))

    def _required_dtype(self) -> torch.dtype | None:
        """dtype images must have (``None``: any real floating dtype)."""
        return None

    def check_measurement_shape(self, y: torch.Tensor) -> None:
        """Raise :class:`KLIPMedError` unless ``y`` has shape ``(B, *measurement_shape)``."""
        expected = f"measurement of shape {_shape_text('B', self.measurement_shape)}"
        argument = f"physics {self.kind}"
        expect(isinstance(y, torch.Tensor), argument, f"{expected} (a torch.Tensor)", type(y).__name__)
        expect(
            y.dim() == 1 + len(self.measurement_shape) and tuple(y.shape[1:]) == self.measurement_shape,
            argument,
            expected,
            tuple(y.shape),
        )

    def baseline(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        """Measurement-domain baseline reconstruction, shape ``(B, *image_shape)``."""
        raise KLIPMedError(f"physics {self.kind}: no baseline reconstruction defined")

    def describe(self) -> dict:
        """JSON-ready metadata: kind, shapes, construction parameters and the current noise model."""
        return {
            "kind": self.kind,
            "image_shape": list(self.image_shape),
            "measurement_shape": list(self.measurement_shape),
            "parameters": dict(self.parameters),
            "noise": describe_noise(self.noise_model),
        }
