"""Training (cxr_core.training) without a database: TrainConfig, recipes, real tiny runs, cancel, seeds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr_core.training import fit
from cxr_core.core.errors import ConfigError
from cxr_core.training.outputs import write_model_card
from cxr_core.training.config import DEFAULT_RECIPE, RECIPES, TrainConfig
from cxr_core.training.interface import TrainData, TrainSinks

CLASSES = ("NORMAL", "PNEUMONIA")
TIMING_KEYS = {"epoch_time_s", "images_per_s"}
TINY = dict(recipe="cpu128", dataset="slice", model="small3_50", image_size=32, epochs=1,
            batch_size=16, augment="none", balancing="class_weights")


@pytest.fixture(scope="module")
def real_slice(shared_data, tmp_path_factory) -> Path:
    """32 NORMAL + 32 PNEUMONIA real 224 px films, linked into a Kaggle-style folder."""
    root = tmp_path_factory.mktemp("slice") / "train"
    for cls in CLASSES:
        files = sorted((shared_data / "chest_xray_224" / "train" / cls).glob("*.jpeg"))
        (root / cls).mkdir(parents=True)
        for f in files[::max(1, len(files) // 32)][:32]:
            (root / cls / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def data(real_slice) -> TrainData:
    files = sorted(real_slice.glob("*/*.jpeg"))
    labels = np.array([CLASSES.index(f.parent.name) for f in files])
    is_val = np.arange(len(files)) % 5 == 0  # every 5th image of each class (sorted by class)
    return TrainData("test:slice", CLASSES, tuple(range(1, len(files) + 1)),
                     tuple(str(f) for f in files), tuple(f.name for f in files), labels, is_val)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # shared: pixels decoded once for the module


class Collect:
    """Sinks that keep everything in lists."""

    def __init__(self, cancel_after_batches: int | None = None):
        self.epochs, self.batches, self.logs, self.checks = [], [], [], 0
        self.cancel_after = cancel_after_batches

    def sinks(self) -> TrainSinks:
        return TrainSinks(lambda e, m: self.epochs.append((e, m)),
                          lambda s, m: self.batches.append((s, m)), self.should_cancel,
                          lambda level, msg: self.logs.append((level, msg)), batch_interval_s=0.0)

    def should_cancel(self) -> bool:  # "a user clicks Cancel" once n batches were reported
        self.checks += 1
        return self.cancel_after is not None and len(self.batches) >= self.cancel_after


def cfg(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


# -- TrainConfig ----------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "epochs=0"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"learning_rate": 0}, "learning_rate=0"),
    ({"val_fraction": 0.9}, "val_fraction=0.9"),
    ({"optimizer": "lion"}, "optimizer='lion'"),  # adagrad is one of the reports' now
    ({"lr_schedule": "step"}, "lr_schedule='step'"),
    ({"label_scheme": "four"}, "label_scheme='four'"),
    ({"label_source": "latest"}, "label_source='latest'"),
    ({"balancing": "smote"}, "balancing='smote'"),
    ({"balancing": "oversample"}, "augment='none'"),
    ({"augment": "sepia"}, "augment='sepia'"),
    ({"model": "resnet9000"}, "name='resnet9000'"),
    ({"image_size": 4}, "image_size=4"),
    ({"channels": 2}, "channels=2"),
    ({"freeze_epochs": 1}, "weights=None"),
    ({"freeze_epochs": 5, "weights": "x.keras", "epochs": 3}, "freeze_epochs=5"),
    ({"monitor": "val_auc", "label_scheme": "three_class"}, "monitor='val_auc'"),
    ({"target_ratio": [2, 0]}, "target_ratio="),
    ({"mixed_precision": "yes"}, "mixed_precision='yes'"),
    ({"distribution": "tpu"}, "distribution='tpu'"),
    ({"dataset": ""}, "dataset=''"),
    ({"max_images": 2}, "max_images=2"),
    ({"recipe": "gpu9000"}, "recipe='gpu9000'"),
    ({"colour": "red"}, "['colour']"),
    ({"ema": 1.0}, "ema=1.0"),
    ({"external": "site"}, "external='site'"),
    ({"extra": [{"dataset": "site", "images": "some"}]}, "images='some'"),
    ({"extra": [{"dataset": "site", "repeat": 0}]}, "repeat=0"),
    ({"extra": [{"dataset": "slice"}]}, "extra=['slice']"),
    ({"extra": ["site"], "split": "temporal"}, "split='temporal'"),
])
def test_config_errors_name_the_value(changes, message):
    with pytest.raises(ConfigError, match="Received") as info:
        cfg(**changes)
    assert message in str(info.value)


def test_from_dict_merges_recipe_defaults_and_round_trips():
    c = TrainConfig.from_dict({"recipe": "small50_3class", "dataset": "d", "epochs": 2})
    assert (c.model, c.image_size, c.label_scheme, c.balancing) == (
        "small4_50", 50, "three_class", "oversample")
    assert c.target_ratio == (2.0, 1.0, 2.0) and c.epochs == 2
    again = TrainConfig.from_dict(json.loads(c.to_json()))
    assert again == c
    assert TrainConfig.from_dict({"dataset": "d"}).recipe == DEFAULT_RECIPE


@pytest.mark.parametrize("recipe", ["default224", "cpu128", "mnist28", "robust128"])
def test_binary_recipes_monitor_val_auc_and_fall_back_to_val_loss_for_three_classes(recipe):
    assert TrainConfig.from_dict({"recipe": recipe, "dataset": "d"}).monitor == "val_auc"
    three = TrainConfig.from_dict({"recipe": recipe, "dataset": "d",
                                   "label_scheme": "three_class"})
    assert three.monitor == "val_loss"
    with pytest.raises(ConfigError, match="monitor='val_auc'"):
        TrainConfig.from_dict({"recipe": recipe, "dataset": "d", "label_scheme": "three_class",
                               "monitor": "val_auc"})


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_is_a_valid_config(recipe):
    c = TrainConfig.from_dict({"recipe": recipe, "dataset": "d"})
    assert c.model_config().name == c.model


# -- Real runs ------------------------------------------------------------------------------

def test_one_epoch_run_writes_metrics_checkpoint_and_val_probs(data, cache_root, tmp_path):
    out = Collect()
    res = fit.train(cfg(), data, tmp_path / "run", cache_root=cache_root, sinks=out.sinks())
    assert res.status == "finished" and res.epochs_done == 1
    epoch, metrics = out.epochs[0]
    assert epoch == 1 and {"loss", "accuracy", "auc", "val_loss", "val_auc", "lr"} <= set(metrics)
    assert out.batches and out.batches[0][0] == 1  # global batch numbers from 1
    assert (tmp_path / "run" / "checkpoints" / "epoch_001.keras").is_file()
    assert res.model_path == tmp_path / "run" / "best.keras" and res.model_path.is_file()
    assert res.val_probs.shape == (int(data.is_val.sum()), 2)
    assert np.allclose(res.val_probs.sum(axis=1), 1.0)
    assert set(res.val_image_ids) == {i for i, v in zip(data.image_ids, data.is_val) if v}
    assert res.saliency_layer == "block3_relu" and res.images_per_s > 0


def test_batch_rows_say_where_the_run_is_and_how_long_is_left(data, cache_root, tmp_path):
    """Within-epoch progress: the fraction of epochs done and an ETA at the current pace."""
    out = Collect()
    res = fit.train(cfg(epochs=2, early_stopping=False), data, tmp_path / "run",
                         cache_root=cache_root, sinks=out.sinks())
    steps = -(-res.n_train // 16)  # batches per epoch
    progress = [m["epoch_progress"] for _, m in out.batches]
    assert len(out.batches) == 2 * steps  # batch_interval_s=0: every batch is reported
    assert progress == pytest.approx([(i + 1) / steps for i in range(2 * steps)])
    eta = [m["eta_s"] for _, m in out.batches]
    assert all(e >= 0 for e in eta) and eta[-1] == 0.0 and eta[0] > 0
    assert eta[steps] > eta[-1]  # the second epoch's first batch still has most of it to go


def test_cancel_stops_within_one_batch(data, cache_root, tmp_path):
    out = Collect(cancel_after_batches=2)
    res = fit.train(cfg(epochs=3), data, tmp_path / "run", cache_root=cache_root,
                         sinks=out.sinks())
    assert res.status == "cancelled" and res.epochs_done == 0
    assert [s for s, _ in out.batches] == [1, 2]  # the batch that saw the flag was the last
    assert not out.epochs and not list((tmp_path / "run" / "checkpoints").glob("*.keras"))


def test_same_seed_gives_identical_metrics(data, cache_root, tmp_path):
    runs = []
    for i in range(2):
        out = Collect()
        fit.train(cfg(augment="hflip", seed=3), data, tmp_path / f"run{i}",
                       cache_root=cache_root, sinks=out.sinks())
        runs.append([{k: v for k, v in m.items() if k not in TIMING_KEYS} for _, m in out.epochs])
    assert runs[0] == runs[1]


def test_frozen_stage_trains_the_head_on_cached_features(data, cache_root, tmp_path):
    import keras

    from cxr_core.models import graph as models
    from cxr_core.models import layers
    from cxr_core.models.specs import ModelConfig

    pretrained = tmp_path / "pretrained.keras"  # stands in for ImageNet weights (none offline)
    models.build_model(ModelConfig("small3_50", 32, 1), 2).save(pretrained)
    before = keras.models.load_model(pretrained, custom_objects=layers.CUSTOM_OBJECTS)
    out = Collect()
    res = fit.train(cfg(weights=str(pretrained), freeze_epochs=1, epochs=2), data,
                         tmp_path / "run", cache_root=cache_root, sinks=out.sinks())
    assert res.status == "finished" and res.epochs_done == 2 and res.feature_cache
    assert any("cached features" in msg for _, msg in out.logs)
    after = layers.load_model(res.model_path)
    conv = "block1_conv"  # frozen in stage 1, fine-tuned at a lower rate in stage 2
    assert not np.allclose(before.get_layer(conv).get_weights()[0],
                           after.get_layer(conv).get_weights()[0])


def test_mixed_precision_runs_on_cpu_and_policy_is_restored(data, cache_root, tmp_path):
    import keras

    from cxr_core.models import layers

    res = fit.train(cfg(mixed_precision=True, augment="rot10_shift_flip"), data,
                         tmp_path / "run", cache_root=cache_root, sinks=Collect().sinks())
    assert res.status == "finished" and np.isfinite(res.val_probs).all()
    model = layers.load_model(res.model_path)
    assert model.get_layer("block1_conv").dtype_policy.name == "mixed_float16"
    assert model.get_layer("predictions").dtype_policy.name == "float32"  # final layer float32
    assert keras.mixed_precision.global_policy().name == "float32"


def test_model_card_fields(tmp_path):
    c = cfg()
    path = write_model_card(
        tmp_path, name="r", cfg=c, classes=CLASSES, saliency_layer="block3_relu",
        operating_point={"threshold": 0.3}, val_metrics={"auc": 0.9}, dataset={"name": "d"},
        label_snapshot={"hash": "abc", "relabel_id": None})
    card = json.loads(path.read_text())
    for key in ("name", "model", "labels", "label_scheme", "image_size", "channels",
                "saliency_layer", "operating_point", "val_metrics", "training_config", "dataset",
                "label_snapshot", "data_licence"):
        assert key in card
    assert card["data_licence"] == "Kermany et al., Cell 2018, CC BY 4.0"
    assert card["training_config"] == c.to_dict()


def test_saved_augmentation_preset_is_resolved_into_the_run_config(cxr_home, tiny_dataset):
    from cxr_core.data import presets
    from cxr_core.data.augment_config import AugmentConfig
    from cxr_core.storage import open_db
    from cxr_core.training.service import make_config

    db = open_db()
    presets.save(db, "clinic-mild", AugmentConfig(rotation=7.0, hflip=True, seed=3))
    cfg = make_config(db, {"recipe": "cpu128", "dataset": str(tiny_dataset),
                           "augment": "clinic-mild"})
    assert cfg.augment_config() == AugmentConfig(rotation=7.0, hflip=True, seed=3)
    with pytest.raises(Exception, match="unknown augmentation preset"):
        make_config(db, {"recipe": "cpu128", "dataset": str(tiny_dataset), "augment": "nope"})


@pytest.mark.parametrize("recipe", ["default224", "cpu128", "mnist28", "robust128"])
def test_recipe_defaults_are_the_configs_measured_in_docs_experiments(recipe):
    # docs/experiments.md reports these runs; a recipe edit must come with a new experiment.
    measured = json.loads((Path(__file__).parents[1] / "docs" / "experiments"
                           / f"{recipe}.json").read_text())
    assert measured["recipe"] == recipe
    from_file = TrainConfig.from_dict(measured).to_dict()
    from_recipe = TrainConfig.from_dict({"recipe": recipe, "dataset": measured["dataset"],
                                         "name": measured["name"]}).to_dict()
    assert from_file == from_recipe


def test_every_recorded_experiment_config_is_valid_and_reported():
    """docs/experiments/*.json are the configs of the runs docs/experiments.md reports: each
    still loads as a run config (a renamed option would make it unreproducible) and is named
    in the report."""
    root = Path(__file__).parents[1] / "docs"
    report = (root / "experiments.md").read_text()
    files = sorted((root / "experiments").glob("*.json"))
    assert len(files) >= 10
    for f in files:
        TrainConfig.from_dict(json.loads(f.read_text()))
        assert f.name in report, f"{f.name} is not reported in docs/experiments.md"


def test_host_recipe_proposes_mnist28_for_an_npz_and_the_default_recipe_otherwise():
    from cxr_core.training import service as svc

    assert svc.host_recipe("npz") == "mnist28"
    assert svc.host_recipe("splits") == svc.host_recipe() == "robust128"  # no GPU here


def test_weight_averaging_validates_and_checkpoints_the_averaged_weights(data, cache_root,
                                                                         tmp_path):
    """``ema``: the optimizer keeps the moving average (Keras use_ema), SwapEMAWeights puts it
    in the model before validation and the epoch checkpoint: the saved best model is the
    average, not the last step's weights."""
    from cxr_core.models import layers

    sinks = Collect()
    res = fit.train(cfg(ema=0.9, epochs=2), data, tmp_path / "run", cache_root=cache_root,
                    sinks=sinks.sinks())
    assert res.status == "finished" and np.isfinite(res.val_probs).all()
    assert [e for e, _ in sinks.epochs] == [1, 2]
    assert layers.load_model(res.model_path).count_params() > 0
    saved = layers.load_model(tmp_path / "run" / "checkpoints" / "epoch_001.keras", compile=True)
    opt = saved.optimizer
    assert opt.use_ema and opt.ema_momentum == pytest.approx(0.9)
    # Mid-run, the averaged weights are in the model; the optimizer keeps the raw ones.
    model_w = [np.asarray(v) for v in saved.trainable_weights]
    avg = [np.asarray(v) for v in opt._model_variables_moving_average]
    assert any(not np.allclose(a, b) for a, b in zip(model_w, avg))
