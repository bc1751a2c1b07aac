"""Residual VQ as a model's quantizer: the ``"residual"`` spec, a level of S stages giving S code
maps of one resolution (stage 0 first), exact decoding from the codes, every prefix of the maps
decoding from the sum of its stages, and the per-map statistics."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import DATA, TINY, TINY2

from vqkit.codec.codec import Codec
from vqkit.data.datasets import from_model
from vqkit.errors import CodecError, ConfigError
from vqkit.nn.quantize import CodebookUsage
from vqkit.nn.quantizers import parse_quantizer
from vqkit.nn.residual import ResidualVQ
from vqkit.nn.vqvae import VQVAE2Config, VQVAEConfig, build_model, with_quantizer
from vqkit.runs import checkpoint as ckpt

RESIDUAL = {"kind": "residual", "stages": 2, "quantize_dropout": True}
# One level of two stages (7x7, K = 16 each) trained with quantize dropout; and a hierarchy whose
# top level (7x7, K = 8) has three stages, without, above an ordinary 14x14 bottom level (K = 16).
ONE = with_quantizer(TINY, RESIDUAL)
TWO = with_quantizer(dataclasses.replace(TINY2, prefix_training="loss"),
                     [{"kind": "residual", "stages": 3}, {"kind": "vq"}])
X = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("text, spec", [
    ("residual:2", {"kind": "residual", "stages": 2}),
    ("residual:stages=3,shared,quantize_dropout,cosine",
     {"kind": "residual", "stages": 3, "shared": True, "quantize_dropout": True, "cosine": True}),
    ("residual:4,quantize_dropout=false", {"kind": "residual", "stages": 4}),
])
def test_command_line_spellings(text, spec):
    assert parse_quantizer(text) == spec


@pytest.mark.parametrize("quantizer, needle", [
    ({"kind": "residual"}, "quantizer: the residual quantizer needs 'stages'"),
    ({"kind": "residual", "stages": 0}, "residual option 'stages' must be an integer in 1..8, got 0"),
    ({"kind": "residual", "stages": 9}, "'stages' must be an integer in 1..8, got 9"),
    ({"kind": "residual", "stages": True}, "'stages' must be an integer in 1..8, got True"),
    ({"kind": "residual", "stages": 2, "factor_dim": 4}, "unknown residual option(s) factor_dim"),
    ({"kind": "residual", "stages": 2, "rotation": True}, "unknown residual option(s) rotation"),
    ({"kind": "residual", "stages": 2, "shared": "yes"}, "residual option 'shared' must be true or false"),
    ({"kind": "residual", "stages": 2, "quantize_dropout": 1}, "'quantize_dropout' must be true or false"),
    ([{"kind": "vq"}, {"kind": "residual", "stages": -1}], "quantizer[1]: residual option 'stages'"),
])
def test_bad_specs_are_config_errors_naming_the_field(quantizer, needle):
    with pytest.raises(ConfigError) as info:
        VQVAE2Config.from_dict({**TINY2.to_dict(), "quantizer": quantizer})
    assert needle in str(info.value)


def test_bad_command_line_spellings_name_the_option():
    with pytest.raises(ConfigError, match=r"--quantizer 'residual:2,sharde'.*unknown residual option\(s\) sharde"):
        parse_quantizer("residual:2,sharde")


@pytest.mark.parametrize("config", [ONE, TWO], ids=["vqvae", "vqvae2"])
def test_config_round_trips_and_lists_its_code_maps(config, tmp_path):
    ckpt.write_config(tmp_path, config, {})
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    assert saved["quantizer"] == config.quantizer
    back = ckpt.model_config_of(tmp_path)
    assert back == config and back.to_dict() == config.to_dict() and type(back) is type(config)
    maps = config.code_maps()
    if config is ONE:
        assert [(m.name, m.level, m.stage, m.codebook_size, m.stride) for m in maps] == \
            [("codes.0", 0, 0, 16, 4), ("codes.1", 0, 1, 16, 4)]
        assert config.map_shapes(28, 28) == [(7, 7), (7, 7)]
    else:
        assert [m.name for m in maps] == ["top.0", "top.1", "top.2", "bottom"]
        assert [(m.codebook_size, m.stride) for m in maps] == [(8, 4), (8, 4), (8, 4), (16, 2)]
        assert config.map_shapes(28, 28) == [(7, 7)] * 3 + [(14, 14)]
    # Without a residual level, maps are the levels, named as ever.
    assert [m.name for m in TINY2.code_maps()] == ["top", "bottom"] and TINY.num_maps == 1


def _trained(config: VQVAEConfig | VQVAE2Config):
    torch.manual_seed(0)
    model = build_model(config)
    for _ in range(2):  # k-means on the first batch, then EMA
        model(X)
    return model.eval()


@pytest.mark.parametrize("config", [ONE, TWO], ids=["vqvae", "vqvae2"])
def test_a_training_step_reaches_the_encoder_and_reports_per_map(config):
    torch.manual_seed(0)
    model = build_model(config)
    out = model(X)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[-1].parameters())
    shapes = [(4, *s) for s in config.map_shapes(28, 28)]
    assert [tuple(c.shape) for c in out.codes] == shapes
    assert len(out.perplexity) == len(out.usage) == config.num_maps
    residual = next(q for q in model.quantizers if isinstance(q, ResidualVQ))
    assert residual.quantize_dropout == (config is ONE)
    if config is ONE:
        # Quantize dropout: a pass that leaves stage 1 out gives it codes -1 and usage 0, which
        # usage counts skip.
        passes = [model(X) for _ in range(8)]
        short = next(out for out in passes if (out.codes[1] == -1).all())
        assert float(short.usage[1]) == 0 and (short.codes[0] >= 0).all()
        counter = CodebookUsage(16)
        counter.update(short.codes[1])
        counter.update(short.codes[0])
        assert counter.counts.sum() == short.codes[0].numel()


@pytest.mark.parametrize("config", [ONE, TWO], ids=["vqvae", "vqvae2"])
def test_codes_decode_exactly_and_every_prefix_decodes_from_its_stages(config):
    model = _trained(config)
    codes = model.encode(X)
    assert [tuple(c.shape) for c in codes] == [(4, *s) for s in config.map_shapes(28, 28)]
    out = model(X)
    assert all(torch.equal(a, b) for a, b in zip(codes, out.codes))
    torch.testing.assert_close(model.decode(codes), out.x_hat.clamp(-1, 1), rtol=0, atol=1e-5)
    # The lookup of a residual level's codes is the quantizer's z_q: the sum of the stages' vectors.
    level = 0
    rvq = model.quantizers[level]
    z_e = model.encode_levels(X)[level]
    stages = [m for m in config.code_maps() if m.level == level]
    by_hand = sum(rvq.stage(s).codebook[codes[s]] for s in range(len(stages))).permute(0, 3, 1, 2)
    torch.testing.assert_close(rvq(z_e).z_q, by_hand, rtol=0, atol=1e-6)
    # Prefix p: the first p stages' sum for the level, the levels below missing.
    for p in range(1, len(stages) + 1):
        z_q = sum(rvq.stage(s).codebook[codes[s]] for s in range(p)).permute(0, 3, 1, 2)
        expected = model.likelihood.mean(model._decode_z_q([z_q], 1)).clamp(-1, 1)
        torch.testing.assert_close(model.decode_levels(codes, p), expected, rtol=0, atol=1e-6)
    views = [model.decode_levels(codes, p) for p in range(1, config.num_maps + 1)]
    assert all(not torch.equal(a, b) for a, b in zip(views, views[1:]))
    # Without stage 1: the other stages' sum.
    others = sum(rvq.stage(s).codebook[codes[s]] for s in range(len(stages)) if s != 1).permute(0, 3, 1, 2)
    z_qs = [others] + ([model.quantizers[1].lookup(codes[-1])] if config.num_levels > 1 else [])
    torch.testing.assert_close(model.decode_without(codes, 1),
                               model.likelihood.mean(model._decode_z_q(z_qs)).clamp(-1, 1), rtol=0, atol=1e-6)


def test_each_stage_is_inspected_on_the_residual_it_quantized():
    model = _trained(ONE)
    rvq = model.quantizers[0]
    (codes0, dist0), (codes1, dist1) = model.encode_maps(X)
    assert [torch.equal(a, b) for a, b in zip((codes0, codes1), model.encode(X))] == [True, True]
    z_e = model.encode_levels(X)[0].movedim(1, -1)  # (B, h, w, D)
    r1 = z_e - rvq.stage(0).codebook[codes0]
    torch.testing.assert_close(dist0, r1.square().sum(-1))
    torch.testing.assert_close(dist1, (r1 - rvq.stage(1).codebook[codes1]).square().sum(-1))
    assert [tuple(v.shape) for v in model.map_code_vectors()] == [(16, 4), (16, 4)]


def test_fixing_a_residual_levels_codes_needs_all_its_stages():
    model = _trained(TWO)
    codes = model.encode(X)
    z_es = model.encode_levels(X, codes[:3])
    torch.testing.assert_close(z_es[1], model.encode_levels(X)[1])
    with pytest.raises(Exception, match="end inside level 0"):
        model.encode_levels(X, codes[:2])


def test_a_hierarchys_residual_stages_are_progressive_levels_of_a_vq_file():
    model = _trained(TWO)
    codec = Codec(model, "fingerprint")
    image = (torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    result = codec.compress(image, "uniform")
    assert [(h, w, k) for h, w, k in result.header.levels] == [(7, 7, 8)] * 3 + [(14, 14, 16)]
    assert torch.equal(codec.decompress(result.data), codec.reconstruct(image, "uniform"))
    for p in range(1, 4):
        header, codes = codec.decompress_codes(result.data[:result.prefix_bytes(p)])
        assert len(codes) == p and all(torch.equal(a, b) for a, b in zip(codes, result.codes))
        preview = from_model(model.decode_levels([c[None] for c in codes], p))[0]
        assert torch.equal(codec.decompress(result.data, levels=p), preview)
    with pytest.raises(CodecError, match=r"truncated inside level 2 \(top.2\)"):
        codec.decompress(result.data[:result.prefix_bytes(2) + 1], levels=3)


def test_latent_use_reads_a_residual_levels_vectors():
    from vqkit.data.datasets import load_dataset
    from vqkit.training.latents import latent_use
    model = _trained(TWO)
    codes = model.encode(X)
    z_qs = model.quantized(codes)
    assert [tuple(z.shape) for z in z_qs] == [(4, 4, 7, 7), (4, 4, 14, 14)]
    torch.testing.assert_close(z_qs[0], model.quantizers[0].lookup(torch.stack(codes[:3], -1)))
    use = latent_use(model, load_dataset(DATA, "test"), limit=8)  # over each level's z_q, not each map
    assert use.latents == 4 * 7 * 7 + 4 * 14 * 14 and use.images == 8
