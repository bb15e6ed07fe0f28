"""Predict benchmark: a warm cached model and explainer vs loading the model per request.

One request = what the Predict page does for one uploaded film: decode it with the one image
loader, predict at the stored operating point, and compute a Grad-CAM map of the predicted class.

Baseline: every request loads the model (``load_model_ref``) and builds a fresh saliency
explainer first, as a page without ``st.cache_resource`` would.
Ours: the same request on the ``LoadedModel`` and ``SaliencyExplainer`` kept warm (what
``app_pages/predict.py`` caches with ``st.cache_resource``). Target ratio ≥ 10×.

Also reported: on the warm model, the Grad-CAM time against a plain predict of the same image.
Both are measured in the same process on real full-resolution films
(``chest_xray_fullres_sample/train``); times are medians.

Run: ``python -m cxr_core bench predict --json`` or ``python -m bench.predict [SHARED_DATA]``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

TARGET = 10.0


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(shared_data: Path, *, repeat: int = 5, model_ref: str = "default") -> dict:
    """Measure cold (load per request) and warm requests on the shipped default model.

    Args:
        shared_data: the shared data folder (``../shared/data``).
        repeat: requests per measurement (each cold request loads the model again).
        model_ref: the model to measure ("default", "run:ID" or a .keras path).

    Returns:
        ``{"bench": "predict", "baseline": {...}, "ours": {...}, "ratio": cold / warm}``.
    """
    from cxr_core.models.refs import load_model_ref
    from cxr_core.predict import explain, inference

    files = sorted((Path(shared_data) / "chest_xray_fullres_sample" / "train").glob("*/*.jpeg"))
    if not files:
        raise FileNotFoundError(f"no full-resolution films under {shared_data}")
    items = [inference.ImageInput(f.name, data=f.read_bytes()) for f in files[:max(2, repeat)]]
    counter = iter(range(10**9))

    def request(loaded, explainer) -> None:
        item = items[next(counter) % len(items)]
        pred = inference.predict_batch(loaded, [item]).predictions[0]
        explain.saliency_map(explainer, pred.pixels, "gradcam", pred.class_index)

    def cold() -> None:
        loaded = load_model_ref(model_ref)
        request(loaded, explain.make_explainer(loaded))

    cold()  # imports and first-use costs belong to neither side
    load_s = _median_time(lambda: load_model_ref(model_ref), repeat)
    cold_s = _median_time(cold, repeat)

    loaded = load_model_ref(model_ref)
    explainer = explain.make_explainer(loaded)
    request(loaded, explainer)  # warm-up: traces the predict and gradient functions
    warm_s = _median_time(lambda: request(loaded, explainer), repeat * 2)
    pixels = [inference.predict_batch(loaded, [i]).predictions[0] for i in items]
    predict_s = _median_time(lambda: inference.predict_batch(loaded, items[:1]), repeat * 2)
    gradcam_s = _median_time(lambda: explain.saliency_map(
        explainer, pixels[0].pixels, "gradcam", pixels[0].class_index), repeat * 2)
    return {
        "bench": "predict", "model": model_ref, "image_size": loaded.image_size,
        "images": len(items), "repeat": repeat,
        "baseline": {"load_per_request_s": round(cold_s, 4), "model_load_s": round(load_s, 4)},
        "ours": {"warm_predict_gradcam_s": round(warm_s, 4),
                 "warm_predict_s": round(predict_s, 4), "warm_gradcam_s": round(gradcam_s, 4),
                 "gradcam_over_predict": round(gradcam_s / predict_s, 2)},
        "ratio": round(cold_s / warm_s, 1), "target": TARGET,
    }


if __name__ == "__main__":
    data = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    print(json.dumps(run(data)))
