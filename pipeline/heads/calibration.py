"""What travels with a trained head besides its weights: thresholds chosen on val, and an optional temperature.

:class:`HeadCalibration` holds the operating points of ``names.THRESHOLD_RULES`` chosen on the val scores (each
with its val accuracy, real and fake accuracy) and, with ``calibration: temperature``, a temperature T fitted
on the val logits (LBFGS on the binary cross-entropy), so that every score of the run is
``sigmoid(mean logit / T)``. It is stored in the head's metadata (``run_folder.CALIBRATION_METADATA_KEYS``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..names import CALIBRATIONS, THRESHOLD_RULES
from ..results.metrics import POINT_FIELDS, OperatingPoint, choose_thresholds
from ..results.run_folder import CALIBRATION_METADATA_KEYS
from .head import CheckpointError, crop_scores

TEMPERATURE_RANGE = (1e-2, 1e2)  # a fitted temperature is clipped into it


@dataclass(frozen=True)
class HeadCalibration:
    """A head's temperature and its thresholds chosen on val, with the val metrics at each."""

    method: str  # one of CALIBRATIONS
    temperature: float  # scores are sigmoid(mean logit / temperature); 1.0 without calibration
    thresholds: Mapping[str, OperatingPoint]  # THRESHOLD_RULES -> point on val
    val_split: str
    n_val: int

    def threshold_values(self) -> dict[str, float]:
        return {rule: point.threshold for rule, point in self.thresholds.items()}

    def scores(self, logits: torch.Tensor) -> np.ndarray:
        """Probability of fake from the logits of each image's crops, shape (N, n_crops)."""
        return calibrated_scores(logits, self.temperature)

    def as_json(self) -> dict[str, Any]:
        """Typed values under the metadata keys (``config.json`` of an exported detector holds them)."""
        return {
            "calibration": self.method,
            "temperature": float(self.temperature),
            "val_split": self.val_split,
            "n_val": self.n_val,
            "thresholds": {rule: point.as_dict() for rule, point in self.thresholds.items()},
        }

    def to_metadata(self) -> dict[str, str]:
        """:meth:`as_json` as safetensors metadata: strings (the thresholds as JSON text)."""
        values = self.as_json()
        return {
            key: json.dumps(value) if key == "thresholds" else repr(value) if key == "temperature" else str(value)
            for key, value in values.items()
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], where: object) -> HeadCalibration:
        """Read what :meth:`to_metadata` wrote; ``CheckpointError`` names the missing or bad key."""
        missing = [key for key in CALIBRATION_METADATA_KEYS if key not in metadata]
        if missing:
            raise CheckpointError(f"{where}: head metadata lacks {', '.join(missing)} (calibration and thresholds)")
        try:
            thresholds = json.loads(metadata["thresholds"])
        except ValueError as error:
            raise CheckpointError(f"{where}: head metadata: bad calibration or thresholds ({error!r})") from None
        return cls.from_json({**metadata, "thresholds": thresholds}, where)

    @classmethod
    def from_json(cls, values: Mapping[str, Any], where: object) -> HeadCalibration:
        """Read :meth:`as_json`'s values (numbers may come as text); ``CheckpointError`` names what is wrong."""
        try:
            method = values["calibration"]
            if method not in CALIBRATIONS:
                raise ValueError(f"calibration {method!r} is not one of {', '.join(CALIBRATIONS)}")
            temperature = float(values["temperature"])
            if not (math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"temperature {temperature!r} is not a positive number")
            stored = values["thresholds"]
            thresholds = {
                rule: OperatingPoint(**{f: float(stored[rule][f]) for f in POINT_FIELDS}) for rule in THRESHOLD_RULES
            }
            return cls(method, temperature, thresholds, str(values["val_split"]), int(values["n_val"]))
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"{where}: head metadata: bad calibration or thresholds ({error!r})") from None


def calibrated_scores(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """``sigmoid(mean logit / temperature)`` per row of (N, n_crops) logits: the evaluation's aggregation, float64."""
    return crop_scores(logits.float() / temperature).numpy()


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the mean binary cross-entropy of ``sigmoid(logits / T)``, clipped into ``TEMPERATURE_RANGE``.

    LBFGS (strong Wolfe line search, float64) on the inverse temperature, in
    which the loss is convex. On a val set that the logits separate, the loss
    falls as T shrinks; the search stops where it flattens, with a small T.
    """
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    inverse = torch.ones((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [inverse], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x * inverse, y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    value = inverse.item()
    return high if value <= 1 / high else float(np.clip(1.0 / value, low, high))


def calibrate_head(method: str, val_logits: torch.Tensor, val_labels: np.ndarray, val_split: str) -> HeadCalibration:
    """Fit the temperature (``method == "temperature"``), then choose the thresholds on the val scores.

    ``val_logits``: (N, n_crops) logits of the val rows, ``val_labels`` their labels.
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration {method!r} is not one of {', '.join(CALIBRATIONS)}")
    temperature = 1.0
    if method == "temperature":
        temperature = fit_temperature(val_logits.float().mean(dim=1).cpu().numpy(), val_labels)
    thresholds = choose_thresholds(val_labels, calibrated_scores(val_logits, temperature))
    return HeadCalibration(method, temperature, thresholds, val_split, len(val_labels))
