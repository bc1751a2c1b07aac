import math

import pytest
import torch

from vqkit.nn import quantize
from vqkit.nn.quantize import CodebookUsage, VectorQuantizer, nearest_codes, perplexity


def test_nearest_codes_equals_brute_force_across_block_boundaries(monkeypatch):
    monkeypatch.setattr(quantize, "_CHUNK_ELEMENTS", 7 * 33)  # 7 rows a block, a ragged last block
    g = torch.Generator().manual_seed(0)
    z = torch.randn(100, 5, generator=g)
    codebook = torch.randn(33, 5, generator=g)
    brute = torch.cdist(z.double(), codebook.double()).argmin(1)
    assert torch.equal(nearest_codes(z, codebook), brute)


def _quantizer(**kw):
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3, **kw)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(8, 3))
    return q


def test_straight_through_gradient_is_identity():
    q = _quantizer()
    z_e = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = q(z_e)
    grad = torch.randn_like(out.z_q)
    (out.z_q * grad).sum().backward()
    assert torch.equal(z_e.grad, grad)


def test_forward_values_and_losses_match_the_equations():
    q = _quantizer(beta=0.25)
    z_e = torch.randn(2, 3, 4, 5)
    out = q(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    codes = torch.cdist(flat, q.codebook.detach()).argmin(1)
    assert torch.equal(out.codes.flatten(), codes)
    e = q.codebook.detach()[codes]
    assert torch.allclose(out.z_q.permute(0, 2, 3, 1).reshape(-1, 3), e, atol=1e-6)
    mse = (flat - e).square().mean()
    assert torch.allclose(out.codebook_loss, mse)
    assert torch.allclose(out.commitment_loss, mse)
    assert torch.allclose(out.loss, 1.25 * mse)


def test_codebook_loss_moves_only_codebook_and_commitment_only_encoder():
    q = _quantizer()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = q(z_e)
    g_code = torch.autograd.grad(out.codebook_loss, [z_e, q.codebook], retain_graph=True, allow_unused=True)
    assert g_code[0] is None or torch.count_nonzero(g_code[0]) == 0
    assert torch.count_nonzero(g_code[1]) > 0
    g_commit = torch.autograd.grad(out.commitment_loss, [z_e, q.codebook], allow_unused=True)
    assert torch.count_nonzero(g_commit[0]) > 0
    assert g_commit[1] is None or torch.count_nonzero(g_commit[1]) == 0


def test_decoder_gradient_does_not_reach_the_codebook():
    q = _quantizer()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    recon = q(z_e).z_q.square().sum()  # stands in for any decoder loss
    grad = torch.autograd.grad(recon, q.codebook, allow_unused=True)[0]
    assert grad is None or torch.count_nonzero(grad) == 0


def test_ema_update_matches_hand_computed_example_with_laplace_smoothing():
    q = VectorQuantizer(3, 2, ema=True, decay=0.9, eps=0.5)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0]]))
        q.ema_sum.copy_(q.codebook)
        q.ema_count.fill_(1.0)
    # Three vectors: two nearest code 0, one nearest code 1, none for code 2.
    z_e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 10.0]]).t().reshape(1, 2, 1, 3)
    out = q(z_e)
    assert out.codes.flatten().tolist() == [0, 0, 1]
    # N = 0.9 * 1 + 0.1 * n = [1.1, 1.0, 0.9]
    assert torch.allclose(q.ema_count, torch.tensor([1.1, 1.0, 0.9]))
    # m = 0.9 * m + 0.1 * sums = [(0.1, 0.1), (9.9, 10.0), (90, 90)]
    assert torch.allclose(q.ema_sum, torch.tensor([[0.1, 0.1], [9.9, 10.0], [90.0, 90.0]]))
    # N~ = (N + 0.5) / (3 + 3 * 0.5) * 3 = [16/15, 1.0, 14/15]
    expected = torch.tensor([[0.1 * 15 / 16, 0.1 * 15 / 16], [9.9, 10.0], [90 * 15 / 14, 90 * 15 / 14]])
    assert torch.allclose(q.codebook, expected)
    # The EMA variant has no codebook loss; its output used the codebook from before the update.
    assert out.codebook_loss.item() == 0.0
    assert torch.allclose(out.z_q[0, :, 0, 2], torch.tensor([10.0, 10.0]))


def test_eval_mode_changes_no_statistics():
    q = _quantizer(ema=True, restart_after=1)
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(2, 3, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_perplexity_formula():
    assert perplexity(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([0, 9, 0])).item() == pytest.approx(1.0)
    assert perplexity(torch.tensor([1, 1, 2])).item() == pytest.approx(2 ** 1.5)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_restart_reseeds_exactly_the_unused_codes(ema):
    q = _quantizer(ema=ema, restart_after=1)
    with torch.no_grad():
        q.codebook.copy_(torch.arange(8).float().unsqueeze(1).repeat(1, 3) * 10)
        if ema:
            q.ema_sum.copy_(q.codebook)
    # Every vector lies near code 0 or code 1; codes 2..7 go unused.
    z = torch.cat([torch.zeros(5, 3) + 0.1, torch.zeros(5, 3) + 9.9])
    z_e = z.t().reshape(1, 3, 2, 5)
    before = q.codebook.detach().clone()
    q(z_e)
    after = q.codebook.detach()
    for code in range(2, 8):
        assert any(torch.allclose(after[code], row) for row in z), code
    if not ema:
        assert torch.equal(after[:2], before[:2])
    else:
        assert torch.equal(q.ema_count[2:], torch.ones(6))
    assert q.unused_steps.tolist() == [0] * 8


def test_no_restart_before_the_threshold():
    q = _quantizer(restart_after=3)
    z_e = torch.zeros(1, 3, 2, 2) + q.codebook.detach()[0].view(1, 3, 1, 1)
    before = q.codebook.detach().clone()
    q(z_e)
    q(z_e)
    assert torch.equal(q.codebook.detach(), before)
    assert q.unused_steps.tolist() == [0] + [2] * 7


def test_kmeans_init_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    z = (centres.repeat(64, 1) + 0.01 * torch.randn(256, 2))
    q = VectorQuantizer(4, 2, kmeans_init=True)
    out = q(z.t().reshape(1, 2, 16, 16))
    assert bool(q.initialized)
    for c in centres:
        assert (q.codebook.detach() - c).norm(dim=1).min() < 0.1
    assert out.usage.item() == 1.0


def test_codebook_maths_stays_float32_under_autocast():
    q = _quantizer(ema=True)
    z_e = torch.randn(2, 3, 4, 4)
    reference = q.encode(z_e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z_e.bfloat16().float())
    assert out.z_q.dtype == torch.float32
    assert q.codebook.dtype == q.ema_sum.dtype == torch.float32
    assert torch.equal(out.codes, reference)


def test_codebook_usage_over_batches():
    usage = CodebookUsage(6)
    usage.update(torch.tensor([0, 0, 1]))
    usage.update(torch.tensor([[1, 3]]))
    assert usage.used == 3
    assert usage.fraction == pytest.approx(0.5)
    # counts [2, 2, 0, 1, 0, 0]: p = (0.4, 0.4, 0.2)
    assert usage.perplexity == pytest.approx(math.exp(-(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))))


def test_bad_shapes_and_codes_get_clear_errors():
    q = _quantizer()
    with pytest.raises(ValueError, match="channels"):
        q(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        q.lookup(torch.tensor([[[8]]]))
