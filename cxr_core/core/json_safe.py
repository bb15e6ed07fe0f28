"""numpy values → JSON-safe Python values, and read-only arrays for frozen result types.

JSON has neither nan nor inf, so both become None; arrays become lists. Every ``to_dict`` of the
evaluation results (reports, operating points, McNemar tests) and the plotting tables use these.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def frozen_array(values: Any, dtype: Any = float) -> np.ndarray:
    """Copy into a read-only array so frozen dataclasses stay effectively immutable."""
    arr = np.array(values, dtype=dtype)
    arr.setflags(write=False)
    return arr


def num(value: Any) -> float | None:
    """float, or None for nan/inf (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None


def jsonable(obj: Any) -> Any:
    """Recursively turn numpy values/arrays into JSON-safe Python values (nan/inf → None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return num(obj)
    return obj
