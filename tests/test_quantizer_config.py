"""Choosing the quantizer in a model config: the default leaves old configs (and so the codec's
fingerprints) exactly as they were, specs are canonical and checked with clear errors, and every
kind round-trips through config.json and builds a model whose codes decode."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TINY, TINY2

from vqkit.errors import ConfigError
from vqkit.nn.presets import PRESETS
from vqkit.nn.quantize import VectorQuantizer
from vqkit.nn.quantizers import canonical_spec, parse_quantizer
from vqkit.nn.scalar import FSQ, LFQ
from vqkit.nn.vqvae import VQVAE, VQVAE2Config, VQVAEConfig, build_model, with_quantizer
from vqkit.runs import checkpoint as ckpt

# The model part of a one-level run's config.json as vqkit wrote it before the quantizer field.
OLD_CONFIG = {"in_channels": 1, "hidden": 8, "res_hidden": 4, "num_res_blocks": 1, "code_dim": 4, "beta": 0.25,
              "ema": True, "decay": 0.99, "kmeans_init": True, "restart_after": 100, "likelihood": "gaussian",
              "mixtures": 5, "downsample": 2, "codebook_size": 16}


def test_the_default_keeps_old_configs_and_their_dicts_unchanged():
    config = VQVAEConfig.from_dict(OLD_CONFIG)
    assert config == TINY and config.quantizer is None
    assert config.to_dict() == OLD_CONFIG  # the dict the fingerprints hash, key for key
    for spelling in ({"kind": "vq"}, {"kind": "vq", "cosine": False, "factor_dim": None, "rotation": False},
                     [{"kind": "vq"}]):
        same = VQVAEConfig.from_dict({**OLD_CONFIG, "quantizer": spelling})
        assert same.quantizer is None and same.to_dict() == OLD_CONFIG
    for preset in PRESETS.values():
        assert "quantizer" not in preset.to_dict()
    two = dataclasses.replace(TINY2, quantizer=[{"kind": "vq"}, {"kind": "vq"}])
    assert two.quantizer is None and two.to_dict() == TINY2.to_dict()
    # The model is the one of before: VectorQuantizers with the config's options.
    q = VQVAE(TINY).quantizers[0]
    assert type(q) is VectorQuantizer and q.ema and q.restart_after == 100
    assert not (q.cosine or q.rotation or q.factor_dim)


def test_specs_are_canonical_and_shared_or_per_level():
    assert canonical_spec({"rotation": True, "kind": "vq", "cosine": False}) == {"kind": "vq", "rotation": True}
    config = with_quantizer(TINY2, [{"kind": "fsq", "levels": [4, 3]}, {"kind": "lfq", "bits": 3}])
    assert config.codebook_sizes == [12, 8]
    assert config.level_quantizers() == [{"kind": "fsq", "levels": [4, 3]},
                                         {"kind": "lfq", "bits": 3, "temperature": 1}]
    shared = with_quantizer(TINY2, {"kind": "fsq", "levels": [2, 2, 2]})
    assert shared.quantizer == {"kind": "fsq", "levels": [2, 2, 2]} and shared.codebook_sizes == [8, 8]
    # A list whose entries agree is the shared spec.
    assert with_quantizer(TINY2, [shared.quantizer] * 2) == shared
    # A grid whose K is the config's codebook size needs no with_quantizer.
    fits = VQVAEConfig.from_dict({**OLD_CONFIG, "quantizer": {"kind": "fsq", "levels": [4, 4]}})
    assert isinstance(build_model(fits).quantizers[0], FSQ)
    # with_quantizer back to None is the original config.
    assert with_quantizer(shared, None).quantizer is None


def test_lfq_temperature_is_always_written_so_saved_specs_hash_as_before():
    # The README's LFQ runs spelt out "temperature": 1 when the default was 0.01: their config
    # dicts (which .vq fingerprints hash) must not change now that 1 is the default.
    saved = {"kind": "lfq", "bits": 10, "temperature": 1}
    assert canonical_spec(saved) == saved == canonical_spec({"kind": "lfq", "bits": 10})
    config = VQVAEConfig.from_dict({**OLD_CONFIG, "codebook_size": 1024, "quantizer": saved})
    assert config.to_dict()["quantizer"] == saved
    assert build_model(config).quantizers[0].temperature == 1 == LFQ(10, 4).temperature


@pytest.mark.parametrize("text, spec", [
    ("fsq:8,5,5,5", {"kind": "fsq", "levels": [8, 5, 5, 5]}),
    ("lfq:10", {"kind": "lfq", "bits": 10, "temperature": 1}),
    ("lfq:bits=6,entropy_weight=0.2", {"kind": "lfq", "bits": 6, "entropy_weight": 0.2, "temperature": 1}),
    ("lfq:bits=6,temperature=0.01", {"kind": "lfq", "bits": 6, "temperature": 0.01}),
    ("vq:cosine,rotation,factor_dim=8", {"kind": "vq", "cosine": True, "factor_dim": 8, "rotation": True}),
    ("vq", {"kind": "vq"}),
    ('{"kind": "fsq", "levels": [5, 5]}', {"kind": "fsq", "levels": [5, 5]}),
])
def test_command_line_spellings(text, spec):
    assert parse_quantizer(text) == spec


@pytest.mark.parametrize("data, needle", [
    ({"quantizer": {"kind": "pq"}}, "unknown quantizer kind 'pq'"),
    ({"quantizer": "fsq"}, "a quantizer is an object"),
    ({"quantizer": {"kind": "fsq"}}, "needs 'levels'"),
    ({"quantizer": {"kind": "fsq", "levels": [8, 1]}}, "integers >= 2"),
    ({"quantizer": {"kind": "fsq", "levels": [4, 5]}}, "has 20 codes but codebook_size is 16"),
    ({"quantizer": {"kind": "vq", "cosin": True}}, "unknown vq option(s) cosin"),
    ({"quantizer": {"kind": "vq", "rotation": 1}}, "'rotation' must be true or false"),
    ({"quantizer": {"kind": "vq", "factor_dim": 0}}, "'factor_dim' must be a positive integer"),
    ({"quantizer": {"kind": "lfq", "bits": 4, "temperature": 0}}, "'temperature' must be a number > 0"),
    ({"quantizer": [{"kind": "vq"}] * 2}, "lists 2 quantizer(s) for a model of 1 level(s)"),
])
def test_bad_specs_get_clear_errors(data, needle):
    with pytest.raises(ConfigError) as info:
        VQVAEConfig.from_dict({**OLD_CONFIG, **data})
    assert needle in str(info.value)


def test_bad_command_line_spellings_name_the_option():
    cases = [("fsq:8,x", "cannot read 'x'"), ("{nope", "not valid JSON"), ("zz:1", "unknown quantizer kind")]
    for text, needle in cases:
        with pytest.raises(ConfigError, match="--quantizer") as info:
            parse_quantizer(text)
        assert needle in str(info.value)


def test_a_config_file_with_a_bad_quantizer_names_the_file(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**OLD_CONFIG, "quantizer": {"kind": "lfq"}}))
    with pytest.raises(ConfigError, match="model.json.*needs 'bits'"):
        ckpt.read_model_config(path)


QUANTIZERS = [None, {"kind": "vq", "cosine": True, "factor_dim": 2, "rotation": True},
              {"kind": "fsq", "levels": [4, 3]}, {"kind": "lfq", "bits": 3},
              [{"kind": "fsq", "levels": [2, 2, 2]}, {"kind": "vq", "rotation": True}]]


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=["vq", "vq-options", "fsq", "lfq", "per-level"])
def test_every_kind_round_trips_through_config_json_and_decodes_its_codes(quantizer, tmp_path):
    config = with_quantizer(TINY2, quantizer)
    ckpt.write_config(tmp_path, config, {})
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    assert saved.get("quantizer") == config.quantizer
    back = ckpt.model_config_of(tmp_path)
    assert back == config and type(back) is VQVAE2Config and back.to_dict() == config.to_dict()
    torch.manual_seed(0)
    model = build_model(config)
    kinds = {"vq": VectorQuantizer, "fsq": FSQ, "lfq": LFQ}
    assert [type(q) for q in model.quantizers] == [kinds[s["kind"]] for s in config.level_quantizers()]
    assert [q.codebook_size for q in model.quantizers] == config.codebook_sizes
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    model(x)  # a training step: k-means, EMA
    model.eval()
    codes = model.encode(x)
    assert [c.max() < k for c, k in zip(codes, config.codebook_sizes)] == [True, True]
    torch.testing.assert_close(model.decode(codes), model(x).x_hat.clamp(-1, 1), rtol=0, atol=1e-5)
    # Weights and config together (save_pretrained) rebuild the same model.
    model.save_pretrained(tmp_path / "pretrained")
    again = VQVAE.from_pretrained(tmp_path / "pretrained")
    assert again.config == config and torch.equal(again.decode(codes), model.decode(codes))
