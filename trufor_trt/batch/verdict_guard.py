"""The verdict guard: an image whose reduced-precision score lies near the decision threshold is
analysed again in FP32, and the FP32 result is the one recorded.

FP16 and INT8 move the score by up to their budgets (precision/budgets.py), measured on a finite
set of images; an image unlike them may move more. Far from the threshold that changes no
decision; near it, it could. So within `margin` of the threshold the reduced engine's word is not
taken: the same prepared input goes through the FP32 model of the same folder, opened lazily
(once, for all the runners beside it, used by one thread at a time), and the record keeps the
reduced score beside the FP32 one.

The margin by default: MARGIN_BUDGETS times the precision's score budget, or MARGIN_MEASURED
times the worst score deviation its plan measured, whichever is larger.
"""

import threading
from dataclasses import replace
from typing import Callable, Optional

from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.postprocess import DECISION_THRESHOLD
from trufor_trt.engine.runner_spec import RunnerSpec, open_runners
from trufor_trt.precision.budgets import BUDGETS

MARGIN_BUDGETS = 10
MARGIN_MEASURED = 5


def measured_score_deviation(manifest: dict, precision: str) -> Optional[float]:
    """The worst score deviation from FP32 the variant measured when it was made (its manifest
    entry's deviation_vs_fp32), or None where it recorded none."""
    entry = manifest.get("variants", {}).get(precision) or {}
    worst = ((entry.get("deviation_vs_fp32") or {}).get("max_abs") or {}).get("score")
    return float(worst) if isinstance(worst, (int, float)) else None


def default_margin(precision: str, measured: Optional[float] = None) -> float:
    return max(MARGIN_BUDGETS * BUDGETS[precision]["score"], MARGIN_MEASURED * (measured or 0.0))


class VerdictGuard:
    """`margin` around the threshold; `open_fp32()` returns the loaded FP32 runner, called once,
    when the first image needs it."""

    def __init__(self, margin: float, open_fp32: Callable):
        self.margin = margin
        self._open_fp32 = open_fp32
        self._runner = None
        self._lock = threading.Lock()

    def near_threshold(self, score: float) -> bool:
        return abs(score - DECISION_THRESHOLD) < self.margin  # never with margin 0: the guard is off

    def infer_fp32(self, prepared):
        """(raw outputs, the FP32 runner) for a prepared input."""
        with self._lock:
            if self._runner is None:
                self._runner = self._open_fp32()
            return self._runner.infer(prepared), self._runner

    def close(self) -> None:
        with self._lock:
            if self._runner is not None:
                self._runner.close()
                self._runner = None


def verdict_guard_for(spec: RunnerSpec, margin=None):
    """The verdict guard for runners of a resolved `spec` (off, margin 0, for FP32); `margin`
    None: the precision's default. Its FP32 runner is a runner of the same folder, backend,
    device and memory budget, opened when first needed."""
    if spec.precision == "fp32":
        margin = 0.0
    elif margin is None:
        model = spec.model if isinstance(spec.model, ModelDir) else ModelDir.open(spec.model)
        margin = default_margin(spec.precision, measured_score_deviation(model.manifest, spec.precision))
    fp32 = replace(spec, precision="fp32")
    return VerdictGuard(margin, lambda: open_runners(fp32, 1)[0])
