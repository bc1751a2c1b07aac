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



def _search_modes(monkeypatch, grouped: bool):
    """Both searches of nearest_codes at small sizes: 4 codes a group, so that 33 codes are
    8 groups and a padded ninth of one code and three +inf."""
    monkeypatch.setattr(quantize, "_GROUP_WIDTH", 4)
    monkeypatch.setattr(quantize, "_GROUPED_FROM_K", 1 if grouped else 1 << 30)


@pytest.mark.parametrize("grouped", [False, True], ids=["direct", "grouped"])
def test_nearest_codes_returns_the_first_of_equally_near_codes(monkeypatch, grouped):
    _search_modes(monkeypatch, grouped)
    monkeypatch.setattr(quantize, "_CHUNK_ELEMENTS", 7 * 36)
    g = torch.Generator().manual_seed(1)
    # Small integers: the distances are exact in float32, so equal ones are true ties.
    codebook = torch.randint(-2, 3, (33, 3), generator=g).float()
    codebook[[9, 20, 32]] = codebook[2].clone()  # copies in later groups, the padded one included
    z = torch.randint(-2, 3, (100, 3), generator=g).float()
    z[:10] = codebook[2]
    d = (z.double()[:, None] - codebook.double()[None]).square().sum(2)  # (100, 33)
    first = torch.stack([torch.nonzero(row == row.min())[0, 0] for row in d])
    codes = nearest_codes(z, codebook)
    assert torch.equal(codes, first)
    assert (codes[:10] == 2).all()


@pytest.mark.parametrize("grouped", [False, True], ids=["direct", "grouped"])
def test_nearest_codes_nan_and_empty_batch_match_argmin(monkeypatch, grouped):
    _search_modes(monkeypatch, grouped)
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(10, 3, generator=g)
    z = torch.randn(6, 3, generator=g)
    z[1, 0] = math.nan  # a row whose distances are all NaN: argmin's first, code 0
    codebook[6, 2] = math.nan  # a NaN column in the second group: every row's first NaN
    assert nearest_codes(z, codebook).tolist() == [6, 0, 6, 6, 6, 6]
    assert nearest_codes(z[:0], codebook).shape == (0,)


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


def test_ema_statistics_are_float32_sums_of_the_assigned_vectors():
    # Against float64 arithmetic, under bf16 autocast: sums kept in bfloat16 or float16 would be
    # off by about 1e-3 relative.
    q = _quantizer(ema=True, decay=0.9)
    count, total = q.ema_count.double(), q.ema_sum.double()
    z_e = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z_e)
    flat = z_e.double().permute(0, 2, 3, 1).reshape(-1, 3)
    codes = out.codes.flatten()
    sums = torch.zeros(8, 3, dtype=torch.float64).index_add_(0, codes, flat)
    torch.testing.assert_close(q.ema_count.double(), 0.9 * count + 0.1 * torch.bincount(codes, minlength=8),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(q.ema_sum.double(), 0.9 * total + 0.1 * sums, rtol=1e-5, atol=1e-6)


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
        assert any(torch.equal(after[code], row) for row in z), code  # the vector itself, not smoothed
    if not ema:
        assert torch.equal(after[:2], before[:2])
    else:
        assert torch.equal(q.ema_count[2:], torch.ones(6))
    assert q.unused_steps.tolist() == [0] * 8


def test_restarts_take_distinct_rows_of_the_batch():
    torch.manual_seed(0)
    q = _quantizer(restart_after=1)
    with torch.no_grad():
        q.codebook.copy_(torch.arange(8).float().unsqueeze(1).repeat(1, 3) * 10)
    # Six distinct vectors near codes 0 and 1 leave six codes dead: each must take its own row
    # (drawn with replacement, all six would differ with probability 6! / 6^6 = 1.5%).
    z = torch.cat([torch.zeros(3, 3) + torch.arange(3).unsqueeze(1) * 0.1,
                   torch.zeros(3, 3) + 10 + torch.arange(3).unsqueeze(1) * 0.1])
    q(z.t().reshape(1, 3, 2, 3))
    restarted = q.codebook.detach()[2:]
    assert sorted(map(tuple, restarted.tolist())) == sorted(map(tuple, z.tolist()))
    # Fewer rows than dead codes: every code still restarts, on rows of the batch.
    q = _quantizer(restart_after=1)
    one = torch.full((1, 3, 1, 1), 0.5)
    q(one)
    assert int((q.codebook.detach() == 0.5).all(1).sum()) == 7


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
    with pytest.raises(ValueError, match="no axis 1"):
        q.encode(torch.randn(3))
    with pytest.raises(ValueError, match="no axis 1"):
        q.lookup(torch.tensor(2))
    with pytest.raises(ValueError, match="floating-point"):
        q(torch.ones(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="channel_dim must be an int"):
        VectorQuantizer(8, 3, channel_dim=1.0)
    # What torch.distributed.new_group hands a process outside the group.
    with pytest.raises(ValueError, match="ProcessGroup"):
        VectorQuantizer(8, 3, sync=-100)


def test_gradients_match_the_loss_formulas():
    # M = N * D elements: d(beta * commitment)/dz_e = 2 beta (z_e - e_k) / M, plus the upstream
    # gradient passed straight through; d codebook_loss / de_i = sum_{k_j = i} 2 (e_i - z_e_j) / M.
    beta = 0.25
    q = _quantizer(beta=beta)
    z_e = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = q(z_e)
    upstream = torch.randn_like(out.z_q)
    (out.loss + (out.z_q * upstream).sum()).backward()
    flat = z_e.detach().double().permute(0, 2, 3, 1).reshape(-1, 3)
    codes = out.codes.flatten()
    e = q.codebook.detach().double()[codes]
    m = flat.numel()
    expected_z = upstream.double() + (2 * beta * (flat - e) / m).reshape(2, 4, 5, 3).permute(0, 3, 1, 2)
    expected_codebook = torch.zeros(8, 3, dtype=torch.float64).index_add_(0, codes, 2 * (e - flat) / m)
    torch.testing.assert_close(z_e.grad.double(), expected_z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.codebook.grad.double(), expected_codebook, rtol=1e-5, atol=1e-7)


def _twins(**kw) -> tuple[VectorQuantizer, VectorQuantizer]:
    """Two quantizers with the same state, to feed one input in two layouts."""
    a = _quantizer(**kw)
    b = _quantizer(**kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _same_draws(fn, *args):
    """``fn(*args)`` from the global RNG state it found, which it leaves as it found it, so that
    twins draw the same k-means seeds and restarts."""
    with torch.random.fork_rng():
        return fn(*args)


def _assert_same_state(a: VectorQuantizer, b: VectorQuantizer) -> None:
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


TRAINING = dict(ema=True, kmeans_init=True, kmeans_iters=3, restart_after=1)


@pytest.mark.parametrize("spatial", [(), (7,), (2, 3, 4)], ids=["0d", "1d", "3d"])
def test_feature_maps_of_any_rank_quantize_like_their_positions_as_a_flat_map(spatial):
    # (B, D, *spatial) vs the same vectors as a (B, D, P, 1) map: identical codes, z_q, losses
    # and codebook statistics; and codes/z_q laid out as the positions they belong to.
    q, flat_q = _twins(**TRAINING)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        z_e = torch.randn(2, 3, *spatial, generator=g)
        out = _same_draws(q, z_e)
        ref = flat_q(z_e.reshape(2, 3, -1, 1))
        assert out.codes.shape == (2, *spatial) and out.z_q.shape == z_e.shape
        assert torch.equal(out.codes.flatten(), ref.codes.flatten())
        assert torch.equal(out.z_q, ref.z_q.reshape(z_e.shape))
        assert torch.equal(out.loss, ref.loss) and torch.equal(out.perplexity, ref.perplexity)
        _assert_same_state(q, flat_q)
    # Each position's code is its own vector's nearest (brute force, the trained codebook).
    rows = z_e.movedim(1, -1).reshape(-1, 3)
    assert torch.equal(q.encode(z_e), torch.cdist(rows, q.codebook).argmin(1).reshape(2, *spatial))


def test_sequences_with_channel_dim_last_match_channels_first():
    first, last = _twins(**TRAINING)
    last.channel_dim = -1
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        z = torch.randn(2, 3, 6, generator=g)  # (B, D, N)
        a, b = _same_draws(first, z), last(z.transpose(1, 2).contiguous())  # (B, N, D)
        assert b.codes.shape == (2, 6) and b.z_q.shape == (2, 6, 3)
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.z_q, b.z_q.transpose(1, 2))
        assert torch.equal(a.loss, b.loss) and torch.equal(a.usage, b.usage)
        _assert_same_state(first, last)
    assert last.lookup(b.codes).shape == (2, 6, 3)
    assert torch.equal(last.lookup(b.codes), first.lookup(a.codes).transpose(1, 2))


@pytest.mark.parametrize("channel_dim, shape", [(1, (2, 3, 4, 5)), (1, (4, 3)), (1, (2, 3, 2, 2, 2)),
                                                (-1, (2, 7, 3)), (2, (2, 4, 3, 5))])
def test_codes_to_vectors_round_trip_is_exact(channel_dim, shape):
    q = _quantizer(channel_dim=channel_dim)
    z_e = torch.randn(shape)
    codes = q.encode(z_e)
    assert codes.dtype == torch.long and codes.shape == z_e.movedim(channel_dim, -1).shape[:-1]
    assert torch.equal(q(z_e).codes, codes)
    vectors = q.lookup(codes)
    assert vectors.shape == z_e.shape and vectors.dtype == torch.float32
    assert torch.equal(vectors.movedim(channel_dim, -1), q.codebook.detach()[codes])


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("channel_dim, shape", [(1, (0, 3, 4, 4)), (1, (2, 3, 0)), (-1, (0, 5, 3))])
def test_zero_size_batch(ema, channel_dim, shape):
    q = _quantizer(ema=ema, kmeans_init=True, restart_after=1, channel_dim=channel_dim)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z_e = torch.randn(shape, requires_grad=True)
    out = q(z_e)
    codes_shape = z_e.movedim(channel_dim, -1).shape[:-1]
    assert out.codes.shape == codes_shape and out.z_q.shape == shape
    # Losses 0 (a mean over nothing would be NaN), still in the graph: zero gradients.
    for loss in (out.loss, out.codebook_loss, out.commitment_loss):
        assert loss.item() == 0.0
    assert out.perplexity.item() == 1.0 and out.usage.item() == 0.0
    (out.loss + out.z_q.sum()).backward()
    assert z_e.grad.shape == shape
    if not ema:
        assert torch.equal(q.codebook.grad, torch.zeros(8, 3))
    # k-means and restarts wait for vectors; the codes did go one step unused, and the EMA
    # took in zero counts.
    assert not bool(q.initialized)
    assert q.unused_steps.tolist() == [1] * 8
    if ema:
        assert torch.equal(q.ema_count, before["ema_count"] * 0.99)
        assert torch.equal(q.ema_sum, before["ema_sum"] * 0.99)
    else:
        assert torch.equal(q.codebook.detach(), before["codebook"])
    assert q.encode(z_e).shape == codes_shape and q.lookup(out.codes).shape == shape
    q(torch.randn(2, 3, 4, 4).movedim(1, channel_dim))
    assert bool(q.initialized)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_float_dtype_quantizes_in_float32(dtype):
    # The same vectors in float32 are the reference: same codes, losses and codebook updates;
    # z_q has the wider of the input's dtype and float32 and the straight-through gradient
    # reaches z_e unrounded, in z_e's dtype.
    q, ref_q = _twins(**TRAINING)
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        z_e = torch.randn(2, 3, 4, 4, generator=g).to(dtype).requires_grad_()
        out, ref = _same_draws(q, z_e), ref_q(z_e.detach().float())
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert out.z_q.dtype == out_dtype and out.codes.dtype == torch.long
        assert out.loss.dtype == out.commitment_loss.dtype == out.perplexity.dtype == torch.float32
        assert torch.equal(out.codes, ref.codes)
        assert torch.equal(out.loss, ref.loss) and torch.equal(out.commitment_loss, ref.commitment_loss)
        torch.testing.assert_close(out.z_q.float(), ref.z_q, rtol=0, atol=1e-6)
        _assert_same_state(q, ref_q)
        assert q.codebook.dtype == q.ema_sum.dtype == q.ema_count.dtype == torch.float32
        upstream = torch.randn(out.z_q.shape, generator=g, dtype=out_dtype)
        (out.z_q * upstream).sum().backward()
        assert z_e.grad.dtype == dtype
        assert torch.equal(z_e.grad, upstream.to(dtype))


def _compile_works() -> bool:
    try:
        torch.compile(lambda x: x + 1, backend="aot_eager")(torch.zeros(1))
    except Exception:  # no Dynamo for this Python, or a broken install: nothing of ours to test
        return False
    return True


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
def test_compiled_quantizer_matches_eager():
    # aot_eager traces with Dynamo and AOTAutograd as the default backend does, without
    # Inductor's C++ code generation (half a minute on a cold CPU cache).
    torch._dynamo.reset()
    eager, compiled = _twins(restart_after=2, channel_dim=-1)
    step = torch.compile(compiled, backend="aot_eager")
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        z_e = torch.randn(2, 5, 3, generator=g)
        z_a, z_b = z_e.clone().requires_grad_(), z_e.clone().requires_grad_()
        a, b = _same_draws(eager, z_a), step(z_b)
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(b.z_q, a.z_q)
        torch.testing.assert_close(b.loss, a.loss)
        (a.loss + a.z_q.sum()).backward()
        (b.loss + b.z_q.sum()).backward()
        torch.testing.assert_close(z_b.grad, z_a.grad)
        torch.testing.assert_close(compiled.codebook.grad, eager.codebook.grad)
        _assert_same_state(eager, compiled)


def test_enable_sync_switches_every_quantizer_and_a_bare_one_stays_local():
    model = torch.nn.ModuleDict({"top": VectorQuantizer(4, 2),
                                 "rest": torch.nn.Sequential(torch.nn.Linear(2, 2), VectorQuantizer(4, 2))})
    assert not any(q.sync for q in model.modules() if isinstance(q, VectorQuantizer))
    assert quantize.enable_sync(model) == 2
    assert all(q.sync and q.group is None for q in model.modules() if isinstance(q, VectorQuantizer))
    assert quantize.enable_sync(torch.nn.Linear(2, 2)) == 0
    # Outside a process group sync is a no-op: the same result as a bare quantizer.
    bare, synced = _twins(**TRAINING)
    synced.sync = True
    z_e = torch.randn(2, 3, 4, 4)
    assert torch.equal(_same_draws(bare, z_e).z_q, synced(z_e).z_q)
    _assert_same_state(bare, synced)
