"""AppTest: the augmentation page previews, loads built-in presets and saves a preset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cxr_core.data import presets
from cxr_core.data.augment_config import PRESETS
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db

PAGE = str(Path(__file__).resolve().parents[2] / "app_pages" / "augmentation.py")



def test_preview_grid_and_presets(cxr_home, tiny_dataset):
    index_dataset(open_db(), tiny_dataset, name="tiny")
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    n_images = len(at.get("image"))
    assert n_images >= 9  # the original and 8 variants
    at.selectbox(key="aug_preset").set_value("rot30_zoom_shift_flip")
    at.button[0].click().run()
    assert at.slider(key="aug_rotation").value == 30.0 and at.toggle(key="aug_hflip").value
    at.text_input[0].set_value("my-preset")
    at.button[1].click().run()
    assert not at.exception and not at.error
    assert presets.resolve("my-preset", open_db()).rotation == 30.0


def test_builtin_name_cannot_be_overwritten(cxr_home):
    with pytest.raises(Exception, match="built-in"):
        presets.save(open_db(), "hflip", PRESETS["hflip"])
    with pytest.raises(Exception, match="preset name"):
        presets.save(open_db(), "", PRESETS["hflip"])


def test_same_seed_same_preview():
    from cxr_core.data.augment import augment_preview

    img = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    a = augment_preview(img, PRESETS["rot30_zoom_shift_flip"], 4)
    b = augment_preview(img, PRESETS["rot30_zoom_shift_flip"], 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_the_shift_ops_load_from_a_preset_and_are_saved(cxr_home, tiny_dataset):
    index_dataset(open_db(), tiny_dataset, name="tiny")
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at.selectbox(key="aug_preset").set_value("shift_robust")
    at.button[0].click().run()
    want = PRESETS["shift_robust"]
    assert [at.slider(key=f"aug_{k}").value for k in ("crop", "gamma", "blur", "noise")] == \
        [want.crop, want.gamma, want.blur, want.noise]
    at.slider(key="aug_noise").set_value(12.0).run()
    at.text_input[0].set_value("site-b")
    at.button[1].click().run()
    assert not at.exception and not at.error
    saved = presets.resolve("site-b", open_db())
    assert (saved.crop, saved.gamma, saved.blur, saved.noise) == (want.crop, want.gamma,
                                                                  want.blur, 12.0)
    assert len(at.get("image")) >= 9  # the preview ran with the new ops
