"""The quantizer family: VQ's options (cosine, factorised codes, the rotation trick), FSQ and LFQ,
each against its formula, and the interface they share (any shape, dtypes, autocast, empty
batches, gradients reaching the encoder, exact codes -> vectors)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vqkit.nn import quantize
from vqkit.nn.quantize import VectorQuantizer, rotate_to
from vqkit.nn.scalar import FSQ, LFQ, batch_entropy


def _vq(**kw) -> VectorQuantizer:
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3, **kw)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(q.codebook.shape))
    return q


def _rotation_matrix(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The paper's R (section 4.2) for one pair of vectors, as a matrix: rotates e/||e|| onto q/||q||."""
    e_hat, q_hat = e / e.norm(), q / q.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    eye = torch.eye(len(e), dtype=e.dtype)
    return eye - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)


def test_rotation_trick_forward_equals_vq_and_gradient_matches_the_formula(monkeypatch):
    monkeypatch.setattr(quantize, "_CHUNK_ELEMENTS", 4 * 3 * 7)  # the backward in blocks of 7 rows
    ste, rot = _vq(), _vq(rotation=True)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    z_a, z_b = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, b = ste(z_a), rot(z_b)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.commitment_loss, b.commitment_loss)
    torch.testing.assert_close(b.z_q, a.z_q, rtol=0, atol=1e-12)
    upstream = torch.randn(a.z_q.shape, generator=g, dtype=torch.float64)
    (b.z_q * upstream).sum().backward()
    rows = z.movedim(1, -1).reshape(-1, 3)
    codes = b.codes.flatten()
    ups = upstream.movedim(1, -1).reshape(-1, 3)
    expected = torch.stack([
        (rot.codebook[k].double().norm() / e.norm()) * _rotation_matrix(e, rot.codebook[k].detach().double()).T @ u
        for e, k, u in zip(rows, codes, ups)])
    torch.testing.assert_close(z_b.grad.movedim(1, -1).reshape(-1, 3), expected, rtol=1e-10, atol=1e-12)
    # Not the identity: the gradient does depend on where the code lies.
    assert not torch.allclose(z_b.grad, upstream)


def test_rotation_matrix_rotates_and_degenerate_pairs_are_safe():
    g = torch.Generator().manual_seed(2)
    e, q = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    for i in range(5):
        r = _rotation_matrix(e[i], q[i])
        torch.testing.assert_close(r @ r.T, torch.eye(4, dtype=torch.float64))  # orthogonal
        torch.testing.assert_close(r @ e[i] * q[i].norm() / e[i].norm(), q[i])
    # e opposite to q (w = 0) still maps e onto q with a norm-preserving gradient; a zero e gets
    # a zero gradient instead of inf/NaN.
    e = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    q = torch.tensor([[-2.0, -4.0, 0.0], [1.0, 1.0, 1.0]])
    out = rotate_to(e, q)
    torch.testing.assert_close(out, q)
    grad, = torch.autograd.grad(out, e, torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[0].norm(), torch.tensor(2.0))  # ||q|| / ||e|| = 2
    assert torch.equal(grad[1], torch.zeros(3))


def test_cosine_codebook_searches_by_angle_and_gives_unit_codes():
    q = _vq(cosine=True)
    z = torch.randn(2, 3, 4, 4) * torch.rand(2, 1, 4, 4) * 5  # norms vary; angles decide
    out = q(z)
    rows = z.movedim(1, -1).reshape(-1, 3)
    cos = F.normalize(rows, dim=1) @ F.normalize(q.codebook.detach(), dim=1).T
    assert torch.equal(out.codes.flatten(), cos.argmax(1))
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 4, 4))
    assert torch.equal(q.lookup(out.codes), F.normalize(q.codebook.detach(), dim=1)[out.codes].movedim(-1, 1))
    # The losses live on the sphere: the commitment of unit vectors.
    e = F.normalize(q.codebook.detach(), dim=1)[out.codes.flatten()]
    torch.testing.assert_close(out.commitment_loss, (F.normalize(rows, dim=1) - e).square().mean())


def test_factorised_codes_search_the_small_space_and_project_back():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 6, factor_dim=2, ema=True, kmeans_init=True, kmeans_iters=3, restart_after=1)
    assert q.codebook.shape == (16, 2)
    q(torch.randn(3, 6, 5))
    assert bool(q.initialized)
    q.eval()  # the codebook stays as it is, to compare with
    z = torch.randn(3, 6, 5, requires_grad=True)
    out = q(z)
    assert out.z_q.shape == z.shape
    small = q.project_in(z.detach().movedim(1, -1).reshape(-1, 6))
    assert torch.equal(out.codes.flatten(), torch.cdist(small, q.codebook).argmin(1))
    expected = q.project_out(q.codebook[out.codes.flatten()]).reshape(3, 5, 6).movedim(-1, 1)
    torch.testing.assert_close(out.z_q, expected)
    assert torch.equal(q.lookup(out.codes), q.lookup(q.encode(z)))
    torch.testing.assert_close(q.lookup(out.codes), expected.detach())
    (out.loss + out.z_q.square().sum()).backward()
    assert z.grad.abs().sum() > 0 and q.project_in.weight.grad.abs().sum() > 0
    assert q.project_out.weight.grad.abs().sum() > 0
    assert q.code_vectors().shape == (16, 6)


def _bound_by_paper(x: torch.Tensor, levels: list[int], eps: float = 1e-3) -> torch.Tensor:
    out = []
    for i, n in enumerate(levels):
        half = (n - 1) * (1 + eps) / 2
        offset = 0.5 if n % 2 == 0 else 0.0
        out.append(torch.tanh(x[:, i] + math.atanh(offset / half)) * half - offset)
    return torch.stack(out, 1)


def test_fsq_rounds_the_papers_bound_to_mixed_radix_codes():
    torch.manual_seed(0)
    levels = [8, 5, 5, 5]
    q = FSQ(levels, 4)
    assert q.codebook_size == 1000 and q.project_in is None
    x = torch.randn(4096, 4, dtype=torch.float64) * 3
    assert torch.equal(q.bound(x), _bound_by_paper(x, levels))
    out = q(x.unsqueeze(-1))  # (N, 4, 1)
    digits = torch.round(_bound_by_paper(x, levels)) + torch.tensor([4, 2, 2, 2])
    assert digits.min() == 0 and (digits.max(0).values == torch.tensor([7, 4, 4, 4], dtype=digits.dtype)).all()
    expected = (digits.long() * torch.tensor([1, 8, 40, 200])).sum(1)
    assert torch.equal(out.codes.flatten(), expected)
    assert out.usage.item() == pytest.approx(len(expected.unique()) / 1000)  # usage is float32
    grid = (digits - torch.tensor([4, 2, 2, 2])) / torch.tensor([4, 2, 2, 2])
    torch.testing.assert_close(out.z_q.squeeze(-1), grid)
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5]])
def test_fsq_codes_and_vectors_round_trip_exactly(levels):
    q = FSQ(levels, len(levels))
    codes = torch.arange(q.codebook_size)
    grid = q.code_vectors()
    assert torch.equal(q.grid_to_codes(grid), codes)
    assert len({tuple(row) for row in grid.tolist()}) == q.codebook_size  # distinct points
    assert grid.min() >= -1 and grid.max() <= 1
    # Quantizing a grid point gives that point back (the bound maps it inside its own cell).
    x = torch.atanh(((grid * q._half_width + torch.where(q._levels % 2 == 0, 0.5, 0.0))
                     / ((q._levels - 1) * (1 + q.eps) / 2)).clamp(-0.999999, 0.999999)) \
        - torch.atanh(torch.where(q._levels % 2 == 0, 0.5, 0.0) / ((q._levels - 1) * (1 + q.eps) / 2))
    assert torch.equal(q.encode(x.float().unsqueeze(-1)).flatten(), codes)


def test_lfq_codes_are_the_sign_bits():
    q = LFQ(4, 4)
    x = torch.randn(50, 4)
    out = q(x.unsqueeze(-1))
    expected = ((x > 0).long() * torch.tensor([1, 2, 4, 8])).sum(1)
    assert torch.equal(out.codes.flatten(), expected)
    torch.testing.assert_close(out.z_q.squeeze(-1), torch.where(x > 0, 1.0, -1.0))
    vectors = q.code_vectors()
    assert vectors.shape == (16, 4) and set(vectors.flatten().tolist()) == {-1.0, 1.0}
    assert torch.equal(q.encode(vectors.unsqueeze(-1)).flatten(), torch.arange(16))


def test_lfq_entropy_penalty_matches_the_softmax_over_all_codes():
    q = LFQ(3, 3, beta=0.25, entropy_weight=0.1, diversity=0.7, temperature=0.5).train()
    x = (torch.randn(10, 3, dtype=torch.float64) * 0.5).requires_grad_()
    out = q(x.unsqueeze(-1))
    # Brute force: p(c|x) = softmax(-||x - c||^2 / t) over the 8 corners.
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=torch.float64)
    p = torch.softmax(-torch.cdist(x, corners).square() / 0.5, dim=1)  # (10, 8)
    per_sample = -(p * p.log()).sum(1).mean()
    mean = p.mean(0)
    batch = -(mean * mean.log()).sum()
    sign = torch.where(x > 0, 1.0, -1.0).detach()
    expected = 0.1 * (per_sample - 0.7 * batch) + 0.25 * (x - sign).square().mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-7)
    g_out, = torch.autograd.grad(out.loss, x)
    g_ref, = torch.autograd.grad(expected, x)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-7)
    for d in (1, 4, 5):  # the halves: 0 + 1, 2 + 2 and 2 + 3 bits
        a = torch.randn(7, d, dtype=torch.float64)
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=torch.float64)
        log_p = (corners * F.logsigmoid(a).unsqueeze(1) + (1 - corners) * F.logsigmoid(-a).unsqueeze(1)).sum(2)
        mean = log_p.exp().mean(0)
        torch.testing.assert_close(batch_entropy(a), -(mean * mean.log()).sum())
        assert torch.autograd.gradcheck(batch_entropy, (a.requires_grad_(),))
    # The penalty is a training signal only.
    assert q.eval()(x.unsqueeze(-1)).codebook_loss.item() == 0.0


VARIANTS = {
    "vq-cosine": lambda: VectorQuantizer(8, 4, cosine=True, ema=True, kmeans_init=True, restart_after=1),
    "vq-factor": lambda: VectorQuantizer(8, 4, factor_dim=2, kmeans_init=True, restart_after=1),
    "vq-rotation": lambda: VectorQuantizer(8, 4, rotation=True, ema=True),
    "fsq": lambda: FSQ([4, 3], 4),
    "fsq-same-dim": lambda: FSQ([4, 3, 3, 2], 4),
    "lfq": lambda: LFQ(3, 4),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    torch.manual_seed(0)
    return VARIANTS[request.param]()


def test_gradients_reach_the_encoder(variant):
    encoder = torch.nn.Conv2d(2, 4, 1)
    x = torch.randn(2, 2, 5, 5)
    out = variant(encoder(x))
    (out.loss + out.z_q.square().sum()).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert out.codes.shape == (2, 5, 5) and out.codes.max() < variant.codebook_size


@pytest.mark.parametrize("channel_dim, shape", [(1, (0, 4, 3, 3)), (1, (2, 4, 0)), (-1, (0, 5, 4))])
def test_zero_size_batch(variant, channel_dim, shape):
    variant.channel_dim = channel_dim
    z = torch.randn(shape, requires_grad=True)
    out = variant(z)
    assert out.z_q.shape == shape and out.codes.shape == z.movedim(channel_dim, -1).shape[:-1]
    assert out.loss.item() == 0.0 and out.usage.item() == 0.0 and out.perplexity.item() == 1.0
    (out.loss + out.z_q.sum()).backward()
    assert z.grad.shape == shape
    assert variant.lookup(out.codes).shape == shape and variant.encode(z).shape == out.codes.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_every_float_dtype_quantizes_in_float32(variant, dtype):
    ref = _twin(variant)
    z = torch.randn(2, 4, 3, 3).to(dtype)
    with torch.random.fork_rng():
        out = variant(z.requires_grad_())
    expected = ref(z.detach().float())
    assert torch.equal(out.codes, expected.codes)
    assert out.z_q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.z_q.float(), expected.z_q, rtol=0, atol=1e-5)
    out.z_q.sum().backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()


def _twin(q):
    """A twin of ``q``: same weights and buffers."""
    return copy.deepcopy(q)


def test_autocast_keeps_the_maths_float32(variant):
    z = torch.randn(2, 4, 3, 3)
    ref = _twin(variant)
    with torch.random.fork_rng():
        expected = ref(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = variant(z)
    assert torch.equal(out.codes, expected.codes)
    assert out.z_q.dtype == torch.float32
    torch.testing.assert_close(out.z_q, expected.z_q)


def test_lookup_of_encode_is_the_eval_forward(variant):
    variant(torch.randn(4, 4, 3, 3))  # one training step (k-means, EMA) first
    variant.eval()
    z = torch.randn(2, 4, 3, 3)
    out = variant(z)
    codes = variant.encode(z)
    assert torch.equal(codes, out.codes)
    torch.testing.assert_close(variant.lookup(codes), out.z_q, rtol=0, atol=1e-6)
    assert torch.equal(variant.code_vectors()[codes].movedim(-1, 1), variant.lookup(codes))
    with pytest.raises(ValueError, match="codes must lie in"):
        variant.lookup(torch.tensor([variant.codebook_size]))


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="levels must be"):
        FSQ([8, 1], 4)
    with pytest.raises(ValueError, match="bits must be"):
        LFQ(0, 4)
    with pytest.raises(ValueError, match="factor_dim"):
        VectorQuantizer(8, 4, factor_dim=0)
    with pytest.raises(ValueError, match="channels along"):
        FSQ([8, 5], 4)(torch.randn(2, 3, 4))


def test_normalize_rows_matches_f_normalize_also_for_short_rows(monkeypatch):
    monkeypatch.setattr(quantize, "_CHUNK_ELEMENTS", 4 * 3 * 2)  # the backward in blocks of 2 rows
    x = torch.randn(5, 3, dtype=torch.float64)
    x[1] = 0.0
    x[3] *= 1e-14  # shorter than eps = 1e-12: divided by eps, as F.normalize does
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(5, 3, dtype=torch.float64)
    (quantize.normalize_rows(a) * upstream).sum().backward()
    (F.normalize(b, dim=1) * upstream).sum().backward()
    torch.testing.assert_close(quantize.normalize_rows(x), F.normalize(x, dim=1))
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("shape", [(6, 2), (2, 6)], ids=["wide-out", "wide-in"])
def test_the_projections_are_f_linear(shape):
    layer = torch.nn.Linear(*shape).double()
    x = torch.randn(9, shape[0], dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(quantize._linear(x, layer), layer(x))
    assert torch.autograd.gradcheck(quantize._SkinnyLinear.apply, (x, layer.weight, layer.bias))
    assert quantize._linear(x, None) is x
