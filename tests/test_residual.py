"""Residual VQ: stages on successive residuals, one straight-through gradient over the sum, any
prefix of the stages decodes, quantize dropout, shared codebooks, empty batches and dtypes."""

from __future__ import annotations

import pytest
import torch

from vqkit.errors import UsageError
from vqkit.nn.quantize import VectorQuantizer
from vqkit.nn.residual import ResidualVQ


def _rvq(**kw) -> ResidualVQ:
    torch.manual_seed(0)
    rvq = ResidualVQ(3, 8, 4, **kw)
    with torch.no_grad():
        for q in rvq.quantizers:
            q.codebook.copy_(torch.randn(q.codebook.shape))
    return rvq


def test_each_stage_quantizes_what_the_stages_before_it_left():
    rvq = _rvq()
    z = torch.randn(2, 4, 5, 3)
    out = rvq(z)
    assert out.codes.shape == (2, 5, 3, 3) and out.z_q.shape == z.shape
    residual = z.movedim(1, -1).reshape(-1, 4)
    total = torch.zeros_like(residual)
    codes = out.codes.reshape(-1, 3)
    for s in range(3):
        codebook = rvq.quantizers[s].codebook.detach()
        assert torch.equal(codes[:, s], torch.cdist(residual, codebook).argmin(1))
        total += codebook[codes[:, s]]
        residual = residual - codebook[codes[:, s]]
    torch.testing.assert_close(out.z_q.movedim(1, -1).reshape(-1, 4), total)
    assert out.perplexity.shape == out.usage.shape == (3,)
    # The losses are the stages' own on their residuals.
    assert out.loss.item() == pytest.approx(out.codebook_loss.item() + 0.25 * out.commitment_loss.item(), rel=1e-6)


def test_any_prefix_decodes_and_each_stage_refines():
    rvq = _rvq(ema=True, kmeans_init=True)
    z = torch.randn(64, 4, 6)
    for _ in range(3):
        rvq(z)  # k-means per stage, then EMA
    rvq.eval()
    codes = rvq.encode(z)
    assert torch.equal(codes, rvq(z).codes)
    errors = []
    for n in range(1, 4):
        prefix = rvq.lookup(codes[..., :n])
        assert prefix.shape == z.shape
        expected = sum(rvq.quantizers[s].lookup(codes[..., s]) for s in range(n)).movedim(-1, 1)
        assert torch.equal(prefix, expected)
        errors.append((z - prefix).square().mean().item())
    assert errors[0] > errors[1] > errors[2]
    torch.testing.assert_close(rvq.lookup(codes), rvq(z).z_q)
    with pytest.raises(ValueError, match="depth axis"):
        rvq.lookup(torch.zeros(2, 4, dtype=torch.long))


def test_straight_through_once_over_the_sum():
    rvq = _rvq()
    z = torch.randn(2, 4, 3, requires_grad=True)
    out = rvq(z)
    upstream = torch.randn_like(out.z_q)
    (out.z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # identity, not 3x
    z.grad = None
    rvq(z).loss.backward()  # the commitment terms reach z_e through the residuals
    assert z.grad.abs().sum() > 0


def test_quantize_dropout_trains_prefixes_and_marks_the_rest():
    rvq = _rvq(quantize_dropout=True)
    seen = set()
    torch.manual_seed(1)
    for _ in range(30):
        out = rvq(torch.randn(2, 4, 3))
        n = int((out.codes[0, 0] >= 0).sum())
        seen.add(n)
        assert (out.codes[..., :n] >= 0).all() and (out.codes[..., n:] == -1).all()
        assert (out.usage[n:] == 0).all()
        torch.testing.assert_close(out.z_q, rvq.lookup(out.codes[..., :n]))
    assert seen == {1, 2, 3}
    rvq.eval()
    assert (rvq(torch.randn(2, 4, 3)).codes >= 0).all()  # evaluation uses every stage


def test_shared_codebook_is_one_quantizer():
    rvq = _rvq(shared=True)
    assert len(rvq.quantizers) == 1 and all(rvq.stage(s) is rvq.quantizers[0] for s in range(3))
    out = rvq(torch.randn(2, 4, 3))
    assert out.codes.max() < 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_and_an_empty_batch(dtype):
    rvq = _rvq(ema=True)
    ref = _rvq(ema=True)
    z = torch.randn(2, 4, 3).to(dtype)
    out = rvq(z.requires_grad_())
    assert torch.equal(out.codes, ref(z.detach().float()).codes)
    assert out.z_q.dtype == torch.promote_types(dtype, torch.float32)
    out.z_q.sum().backward()
    assert z.grad.dtype == dtype
    empty = rvq(torch.randn(0, 4, 3, requires_grad=True))
    assert empty.codes.shape == (0, 3, 3) and empty.loss.item() == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="stages"):
        ResidualVQ(0, 8, 4)
    with pytest.raises(ValueError, match="factor_dim"):
        ResidualVQ(2, 8, 4, factor_dim=2)
    with pytest.raises(ValueError, match="channels"):
        ResidualVQ(2, 8, 4)(torch.randn(2, 3, 3))
    assert isinstance(ResidualVQ(2, 8, 4).stage(1), VectorQuantizer)


def test_options_that_cannot_apply_to_the_stages_are_refused():
    for options, needle in [({"factor_dim": 2}, "factor_dim does not apply"),
                            ({"rotation": True}, "rotation does not apply")]:
        with pytest.raises(UsageError, match=needle):
            ResidualVQ(2, 8, 4, **options)
