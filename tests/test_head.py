"""The configurable head (issue 28 item 1): every activation with its initialiser, batch norm
except after SELU, dropout (AlphaDropout after SELU), the reports' heads, the reports'
optimisers; and every recipe and the shipped model build exactly as before it existed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import keras
import pytest

from cxr_core.core.errors import ConfigError
from cxr_core.models import layers
from cxr_core.models.graph import build_model
from cxr_core.models.specs import HEAD_ACTIVATIONS, HeadConfig, ModelConfig
from cxr_core.training.config import OPTIMIZERS, RECIPES, TrainConfig

REPO = Path(__file__).resolve().parents[1]

# (parameters, sha256 of the graph's Keras config)[:16] of each recipe's network, measured on
# main before the configurable head existed: with head=None the graphs are the same.
RECIPE_GRAPHS = {
    "default224": (396857, "9003d0052786a7d7"), "cpu128": (1441409, "d8ef8456e62eab1b"),
    "mnist28": (241441, "5ba302c1a0856ac4"), "small50_3class": (684707, "34186ab5745a2b33"),
    "mobilenet_transfer": (3229889, "adab969afb34bb66"),
    "densenet121_transfer": (7038529, "f9d3a821cfa6fbe0"),
    "covid_undersample": (5401603, "1a0211bb78562ecc"),
    "robust128": (1441409, "d8ef8456e62eab1b"),  # cpu128's network (custom5_224, 128 px)
}


def test_every_recipe_is_pinned():
    assert set(RECIPE_GRAPHS) == set(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPE_GRAPHS))
def test_every_recipe_builds_exactly_as_before_the_configurable_head(recipe):
    cfg = TrainConfig.from_dict({"recipe": recipe, "dataset": "x"})
    assert cfg.head is None
    mc = dataclasses.replace(cfg.model_config(), weights=None, freeze_backbone=False,
                             unfreeze_top_k=None)  # offline: no ImageNet file needed
    model = build_model(mc, 3 if cfg.label_scheme != "binary" else 2)
    graph = json.dumps(model.get_config(), sort_keys=True, default=str).encode()
    assert (model.count_params(), hashlib.sha256(graph).hexdigest()[:16]) == RECIPE_GRAPHS[recipe]


def test_the_shipped_model_rebuilds_layer_for_layer_from_its_card():
    card = json.loads((REPO / "models" / "default" / "model_card.json").read_text())
    shipped = layers.load_model(REPO / "models" / "default" / "model.keras")
    cfg = TrainConfig.from_dict(card["training_config"])
    built = build_model(cfg.model_config(), len(card["labels"]))

    def shape(m):
        return [(x.name, type(x).__name__, tuple(x.output.shape)) for x in m.layers]

    assert shape(built) == shape(shipped) and built.count_params() == shipped.count_params()


@pytest.mark.parametrize("activation", sorted(HEAD_ACTIVATIONS))
def test_each_activation_gets_its_initialiser_and_selu_no_batch_norm(activation):
    head = HeadConfig(layers=2, units=(16, 8), activation=activation, batch_norm=True,
                      dropout=0.2)
    model = build_model(ModelConfig("small3_50", image_size=16, channels=1, head=head), 2)
    names = [x.name for x in model.layers if x.name.startswith("head_")]
    dense = model.get_layer("head_dense1")
    init = type(dense.kernel_initializer).__name__.lower()
    expect = {"he_normal": "henormal", "glorot_uniform": "glorotuniform",
              "lecun_normal": "lecunnormal"}[HEAD_ACTIVATIONS[activation]]
    assert init == expect
    assert model.get_layer("head_dense2").units == 8
    assert model.get_layer("head_act1").get_config()["activation"] == activation
    drop = type(model.get_layer("head_dropout1"))
    if activation == "selu":  # self-normalising: no batch norm, AlphaDropout
        assert not any("head_bn" in n for n in names) and drop is keras.layers.AlphaDropout
        assert head.batch_norm is False and dense.use_bias
    else:
        assert {"head_bn1", "head_bn2"} <= set(names) and drop is keras.layers.Dropout
        assert not dense.use_bias  # the batch norm's beta does that job


@pytest.mark.parametrize("head, n_dense", [
    (HeadConfig(1, 512), 1),  # the reports' heads: Dense 64/512/1024 ...
    (HeadConfig(2, (256, 128)), 2),  # ... 256 + 128 ...
    (HeadConfig(3, 32, "selu"), 3),  # ... three 32-unit SELU layers
    (HeadConfig(0, dropout=0.1), 0),
])
def test_the_reports_heads_build_on_any_registry_model(head, n_dense):
    model = build_model(ModelConfig("cxrnet_28", image_size=28, channels=1, head=head), 3)
    dense = [x for x in model.layers if x.name.startswith("head_dense")]
    assert len(dense) == n_dense and model.output.shape[-1] == 3
    assert layers.head_layers(model)[-1].name == "predictions"


@pytest.mark.parametrize("value, message", [
    ({"layers": -1}, "head.layers"), ({"layers": 9}, "head.layers"),
    ({"layers": 2, "units": [8]}, "one width per layer"), ({"units": 0}, "head.units"),
    ({"activation": "gelu"}, "head.activation"), ({"batch_norm": "yes"}, "head.batch_norm"),
    ({"dropout": 1.0}, "head.dropout"), ({"width": 3}, "unknown head keys"),
])
def test_a_bad_head_is_refused_naming_it(value, message):
    with pytest.raises(ConfigError, match=message):
        HeadConfig.from_value(value)


def test_a_head_and_the_old_dropout_together_are_refused():
    with pytest.raises(ConfigError, match="head.dropout"):
        TrainConfig.from_dict({"dataset": "x", "dropout": 0.3, "head": {"layers": 1}})


def test_the_head_round_trips_through_the_run_config_and_describes_itself():
    cfg = TrainConfig.from_dict({"recipe": "cpu128", "dataset": "x",
                                 "head": {"layers": 2, "units": [64, 32], "activation": "elu",
                                          "batch_norm": True, "dropout": 0.3}})
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.head.widths == (64, 32)
    assert cfg.model_config().head_description() == (
        "2 x Dense(64, 32) elu (he_normal), batch norm, dropout 0.3")
    plain = TrainConfig.from_dict({"recipe": "cpu128", "dataset": "x"}).model_config()
    assert plain.head_description().startswith("the architecture's own: flatten")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_reports_optimisers_are_built(name):
    from cxr_core.training import fit

    assert set(OPTIMIZERS) == {"adam", "rmsprop", "adagrad", "adadelta", "adamax", "nadam",
                               "sgd"}
    cfg = TrainConfig.from_dict({"recipe": "cpu128", "dataset": "x", "optimizer": name})
    opt = fit._optimizer(cfg, 0.01, 10)
    assert type(opt).__name__.lower() == name
