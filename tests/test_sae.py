"""SAE modules against independent numpy / dense-autograd references."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_core.errors import UserError
from sae_core.sae import (
    SAEConfig,
    SparseAutoencoder,
    batchtopk_codes,
    geometric_median,
    matryoshka_group_sizes,
)

D_IN, D_SAE, K, B = 16, 64, 4, 32
GROUPS = (8, 24, 32)


def make_sae(arch, seed=0):
    cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, group_sizes=GROUPS if arch == "matryoshka" else ())
    sae = SparseAutoencoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move away from the symmetric init so that every term matters
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        sae.threshold.copy_(torch.rand(D_SAE, generator=g))
    return sae


def np_params(sae):
    return {n: getattr(sae, n).detach().double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


def np_pre(p, x):
    return (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]


def np_select(arch, acts):
    """Boolean mask of active latents during training, by the textbook definition of each arch."""
    if arch == "topk":
        mask = np.zeros_like(acts, dtype=bool)
        top = np.argsort(-acts, axis=1)[:, :K]
        np.put_along_axis(mask, top, True, axis=1)
        return mask & (acts > 0)
    cut = np.sort(acts.ravel())[::-1][K * acts.shape[0] - 1]  # the (k*B)-th largest of the batch
    return (acts >= cut) & (acts > 0)


def test_topk_rows_with_fewer_positive_pre_activations_than_k():
    """TopK keeps the k largest of ReLU(pre): where fewer than k are positive, only those, in inference and in
    training (an encode without the ReLU gave negative codes; a training selection of values >= 0 counted zeros in
    L0 and as fired latents). The other tests' rows all have k positives."""
    sae = SparseAutoencoder(SAEConfig(arch="topk", d_in=8, d_sae=16, k=4), seed=0)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # most pre-activations negative: 0 to 4 positive per row
        pre = sae.pre_acts(x)
        positive = (pre > 0).sum(1)
        assert (positive < 4).any() and (positive > 0).any()
        values, ids = torch.relu(pre).topk(4, dim=1)
        expected = torch.zeros_like(pre).scatter(1, ids, values)
        torch.testing.assert_close(sae.encode(x), expected)
    out = sae.training_forward(x)
    assert out.l0 == pytest.approx(float(positive.clamp(max=4).float().mean()))
    assert out.fired.tolist() == (expected > 0).any(0).tolist()


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka"])
def test_inference_forward_matches_numpy(arch):
    sae = make_sae(arch)
    p = np_params(sae)
    x = np.random.default_rng(0).standard_normal((B, D_IN)) * 2
    pre = np_pre(p, x)
    if arch == "relu":
        z = np.maximum(pre, 0)
    elif arch == "topk":
        z = np.where(np_select("topk", np.maximum(pre, 0)), pre, 0)
    else:  # JumpReLU with the learned per-latent thresholds
        z = np.where((pre > p["threshold"]) & (pre > 0), pre, 0)
    x_hat = z @ p["W_dec"] + p["b_dec"]
    xt = torch.tensor(x, dtype=torch.float32)
    np.testing.assert_allclose(sae.encode(xt).detach().numpy(), z, atol=1e-5)
    np.testing.assert_allclose(sae(xt).detach().numpy(), x_hat, atol=1e-4)
    # tokens of a batch of images, (4 images, 8 tokens, d_in): each token on its own (TopK took the top
    # k of each latent among the 8 tokens), and a float64 input in the SAE's dtype (it was a dtype error)
    tokens = sae.encode(xt.double().reshape(4, 8, D_IN))
    assert tokens.shape == (4, 8, D_SAE) and tokens.dtype == torch.float32
    np.testing.assert_allclose(tokens.detach().numpy(), z.reshape(4, 8, D_SAE), atol=1e-5)
    for bad, message in ((xt[:, :-1], rf"reads vectors of width {D_IN}, but the input has shape \({B}, {D_IN - 1}\)"),
                         (torch.tensor(1.0), r"input has shape \(\)"), (x, "takes a torch tensor, not a ndarray")):
        with pytest.raises(UserError, match=message):
            sae.encode(bad)
    # decode likewise: the tokens' codes, float64 codes in the SAE's dtype, one sentence for a wrong width (it was
    # torch's "mat1 and mat2 shapes cannot be multiplied")
    decoded = sae.decode(torch.tensor(z.reshape(4, 8, D_SAE)))
    assert decoded.dtype == torch.float32
    np.testing.assert_allclose(decoded.detach().numpy(), x_hat.reshape(4, 8, D_IN), atol=1e-4)
    for bad, message in ((torch.zeros(2, D_IN), rf"^SAE.decode reads vectors of width {D_SAE}, but the input has shape "
                                                rf"\(2, {D_IN}\); pass codes of its latents, the width last\.$"),
                         (z, "^SAE.decode takes a torch tensor, not a ndarray")):
        with pytest.raises(UserError, match=message):
            sae.decode(bad)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka"])
def test_training_loss_matches_numpy(arch):
    sae = make_sae(arch)
    p = np_params(sae)
    x = np.random.default_rng(1).standard_normal((B, D_IN)) * 2
    pre = np_pre(p, x)
    if arch == "relu":
        z = np.maximum(pre, 0)
        recon = ((x - (z @ p["W_dec"] + p["b_dec"])) ** 2).sum(1).mean()
        expected = recon + sae.cfg.l1_coeff * (z * np.linalg.norm(p["W_dec"], axis=1)).sum(1).mean()
    else:
        z = np.where(np_select(arch, np.maximum(pre, 0)), pre, 0)
        if arch == "matryoshka":
            bounds = np.cumsum(GROUPS)
            expected = np.mean([
                ((x - (z[:, :b] @ p["W_dec"][:b] + p["b_dec"])) ** 2).sum(1).mean() for b in bounds
            ])
        else:
            expected = ((x - (z @ p["W_dec"] + p["b_dec"])) ** 2).sum(1).mean()
    out = sae.training_forward(torch.tensor(x, dtype=torch.float32))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    if arch != "relu":
        assert out.l0 == pytest.approx((z != 0).sum() / B)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_gradients_equal_dense_autograd(arch):
    """The sparse backward (only active latents) gives the gradients of the dense formula, AuxK included."""
    sae = make_sae(arch)
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(2)) * 2
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    sae.training_forward(x, dead).loss.backward()
    sparse_grads = {n: q.grad.clone() for n, q in sae.named_parameters()}
    sae.zero_grad()

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    mask = torch.from_numpy(np_select(arch, F.relu(pre).detach().double().numpy()))
    z = pre * mask
    if arch == "matryoshka":
        recon = torch.stack([
            (x - (z[:, :b] @ sae.W_dec[:b] + sae.b_dec)).pow(2).sum(1).mean() for b in np.cumsum(GROUPS)
        ]).mean()
    else:
        recon = (x - (z @ sae.W_dec + sae.b_dec)).pow(2).sum(1).mean()
    e = (x - (z @ sae.W_dec + sae.b_dec)).detach()
    dead_acts = F.relu(pre) * dead
    aux_k = min(sae.cfg.effective_aux_k, int(dead.sum()))
    top = dead_acts.topk(aux_k, dim=1).indices
    aux_mask = torch.zeros_like(dead_acts, dtype=torch.bool).scatter_(1, top, True) & (dead_acts > 0)
    e_hat = (pre * aux_mask) @ sae.W_dec  # no decoder bias in the auxiliary reconstruction
    aux = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    (recon + sae.cfg.aux_coeff * aux).backward()
    for n, q in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[n], q.grad, atol=2e-5, rtol=1e-4, msg=n)


def test_batchtopk_selection_is_exact_even_when_one_token_takes_most_winners():
    g = torch.Generator().manual_seed(3)
    acts = F.relu(torch.randn(64, 512, generator=g))
    acts[5] *= 50  # this token holds far more than 4k of the batch's top k*B values
    codes, cut = batchtopk_codes(acts, k=8)
    mask = np.zeros(acts.shape, dtype=bool)
    mask[codes.row.numpy(), codes.col.numpy()] = True
    flat = acts.numpy().ravel()
    reference = acts.numpy() >= np.sort(flat)[::-1][8 * 64 - 1]
    assert (mask == reference).all()
    assert mask.sum() == 8 * 64


def _reference_batchtopk(acts: np.ndarray, k: int):
    """The k*B largest entries written out: the cut is the (k*B)-th largest value; entries above it
    (and above 0) are kept, then entries equal to a positive cut in row-major order up to k*B."""
    flat = acts.ravel()
    total = min(k * acts.shape[0], flat.size)
    cut = np.sort(flat)[::-1][total - 1]
    keep = flat > max(cut, 0)
    if cut > 0:
        tied = np.flatnonzero(flat == cut)[: total - keep.sum()]
        keep[tied] = True
    return keep.reshape(acts.shape), cut


def _selection_cases():
    g = torch.Generator().manual_seed(12)
    skewed = F.relu(torch.randn(64, 512, generator=g))
    skewed[5] *= 50
    # batchtopk_codes guesses the cut from every stride-th entry (stride: 32,768 // 8,192 = 4, moved to 5
    # to share no factor with the width): make exactly those entries large
    overshoot = 0.01 * torch.rand(64, 512, generator=g)
    overshoot.view(-1)[::5] += 1
    return {
        "demo-like": (F.relu(torch.randn(1024, 64, generator=g) @ (torch.randn(64, 512, generator=g) / 8) - 0.05), 16),
        "bf16 ties": (F.relu(torch.randn(256, 512, generator=g)).bfloat16().float(), 8),
        "one token holds most winners": (skewed, 8),
        "fewer positives than k*B": (F.relu(torch.randn(512, 256, generator=g) - 2.5), 16),
        "k*B above the entry count": (F.relu(torch.randn(16, 32, generator=g)), 30),
        "k*B above the entry count, all positive": (torch.rand(16, 32, generator=g) + 0.1, 40),
        "width 67, the sample's first stride": (F.relu(torch.randn(8192, 67, generator=g)), 4),
        "sampled entries are the largest (the guess overshoots)": (overshoot, 200),
    }


@pytest.mark.parametrize("case", list(_selection_cases()))
def test_batchtopk_selection_matches_the_written_out_rule_and_the_multi_process_path(case, tmp_path):
    import torch.distributed as dist

    from sae_core.sae import _batchtopk_codes_distributed

    acts, k = _selection_cases()[case]
    codes, cut = batchtopk_codes(acts, k)
    mask = np.zeros(acts.shape, dtype=bool)
    mask[codes.row.numpy(), codes.col.numpy()] = True
    reference, ref_cut = _reference_batchtopk(acts.numpy(), k)
    assert float(cut) == ref_cut
    assert (mask == reference).all() and codes.col.numel() == reference.sum()
    assert torch.equal(codes.crow[1:] - codes.crow[:-1], torch.from_numpy(reference.sum(1)))
    # the candidate path that several processes take, run by a group of one
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        multi, multi_cut = _batchtopk_codes_distributed(acts, k)
    finally:
        dist.destroy_process_group()
    assert float(multi_cut) == ref_cut
    assert torch.equal(multi.row, codes.row) and torch.equal(multi.col, codes.col)


def test_threshold_is_meaningful_after_one_step():
    """One training step gives thresholds such that inference L0 is close to k (no -1 placeholder)."""
    sae = make_sae("batchtopk")
    with torch.no_grad():
        sae.threshold.zero_()
    x = torch.randn(512, D_IN, generator=torch.Generator().manual_seed(4)) * 2
    sae.train()
    sae.training_forward(x)
    assert (sae.threshold > 0).all()
    l0 = (sae.encode(x) > 0).sum(1).float().mean().item()
    assert K * 0.5 <= l0 <= K * 1.5


def test_thresholds_follow_the_batch_cut_and_unfired_latents_use_the_global_one():
    sae = make_sae("batchtopk")
    with torch.no_grad():
        sae.W_enc[:, :4] = -sae.W_enc[:, :4].abs() * 100  # latents 0..3 can never be selected
        sae.b_enc[:4] = -100
    g = torch.Generator().manual_seed(5)
    sae.train()
    cuts, fired_in = [], []
    for step in range(3):
        x = torch.randn(128, D_IN, generator=g).abs() * (1 + step)
        acts = F.relu(sae.pre_acts(x)).detach().double().numpy()
        cuts.append(np.sort(acts.ravel())[::-1][K * 128 - 1])  # this batch's cut
        fired_in.append(np_select("batchtopk", acts).any(0))
        sae.training_forward(x)
    decay = sae.cfg.threshold_decay
    expected_global = cuts[0]
    for c in cuts[1:]:
        expected_global = decay * expected_global + (1 - decay) * c
    assert sae.global_threshold.item() == pytest.approx(expected_global, rel=1e-5)
    assert not sae.fired_ever[:4].any()
    assert torch.equal(sae.threshold[:4], sae.global_threshold.expand(4))
    for j in range(4, D_SAE):  # textbook EMA over the batches in which latent j fired
        seen = [c for c, f in zip(cuts, fired_in) if f[j]]
        if not seen:
            continue
        ema = seen[0]
        for c in seen[1:]:
            ema = decay * ema + (1 - decay) * c
        assert sae.threshold[j].item() == pytest.approx(ema, rel=1e-5), j


def test_decoder_gradient_projection_and_renormalisation():
    sae = make_sae("topk")
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(D_SAE), atol=1e-5, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_encoder_starts_as_decoder_transpose():
    sae = SparseAutoencoder(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=K), seed=7)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka"])
def test_fold_input_scale_gives_the_same_sae_on_raw_inputs(arch):
    scale = 7.5
    sae = make_sae(arch)
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(6))
    z_scaled, x_hat_scaled = sae.encode(scale * x), sae(scale * x)
    sae.fold_input_scale(scale)
    torch.testing.assert_close(sae.encode(x) * scale, z_scaled, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae(x) * scale, x_hat_scaled, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_geometric_median_minimises_the_sum_of_distances():
    g = torch.Generator().manual_seed(8)
    pts = torch.randn(200, 5, generator=g)
    pts[:20] += 100  # outliers drag the mean, not the median
    med = geometric_median(pts).double()
    cost = lambda c: (pts.double() - c).norm(dim=1).sum().item()
    for _ in range(50):
        assert cost(med) <= cost(med + 0.01 * torch.randn(5, generator=g, dtype=torch.float64)) + 1e-9
    assert med.norm() < pts.mean(0).norm()


def test_group_sizes_and_config_errors():
    assert matryoshka_group_sizes("0.25,0.25,0.5", 64) == (16, 16, 32)
    assert matryoshka_group_sizes("8,24,32", 64) == (8, 24, 32)
    assert sum(matryoshka_group_sizes(None, 1000)) == 1000
    # the default: prefixes of 1/16, 1/8, 1/4, 1/2 and all of the width, each twice the one before
    assert np.cumsum(matryoshka_group_sizes(None, 1024)).tolist() == [64, 128, 256, 512, 1024]
    assert matryoshka_group_sizes("0.3,0.3,0.4", 10) == (3, 3, 4) and matryoshka_group_sizes("0.33,0.33,0.34", 10) == (3, 3, 4)
    # a list that does not add up is refused, not rewritten (16,64,256 became 16,64,176: prefixes 16/80/256)
    with pytest.raises(UserError, match=r"sums to 336, not the width 256.*prefix widths, 16,64,256 are the groups 16,48,192"):
        matryoshka_group_sizes("16,64,256", 256)
    for bad, match in (("100,50", "sums to 150"), ("0.25,0.5,0.5", "must sum to 1, not 1.25"), ("0.5,100", "mixes"),
                       ("8,-8,256", "positive"), ("nan,1", "positive")):
        with pytest.raises(UserError, match=match):
            matryoshka_group_sizes(bad, 256)
    with pytest.raises(UserError, match="sum to the width"):
        SAEConfig(arch="matryoshka", d_in=4, d_sae=10, k=2, group_sizes=(3, 3))
    with pytest.raises(UserError, match="unknown SAE architecture"):
        SAEConfig(arch="gated", d_in=4, d_sae=10)
    with pytest.raises(UserError) as e:  # it named no way out until 2026-12-06
        SAEConfig(arch="topk", d_in=4, d_sae=10, k=11)
    assert str(e.value) == "SAE setting k=11 must be between 1 and the SAE width 10; give a k (train's --k) from 1 to 10."
    # whole numbers, said at once: (4.5, 11.5) summed to 16 and became (4, 11), which training could not split;
    # k 2.5, d_in "8" or 8.5 failed later inside torch
    with pytest.raises(UserError, match=r"group sizes \[4\.5, 11\.5\] must be whole numbers from 1"):
        SAEConfig(arch="matryoshka", d_in=8, d_sae=16, k=4, group_sizes=(4.5, 11.5))
    for bad in ({"k": 2.5}, {"k": True}, {"d_in": 8.5}, {"d_in": "8"}, {"d_sae": 0}):
        with pytest.raises(UserError, match=rf"SAE setting {next(iter(bad))}=.* must be a whole number from 1"):
            SAEConfig(**{"arch": "topk", "d_in": 8, "d_sae": 16, "k": 4, **bad})
    # numpy integers become Python ints (a config of np.int64 could not be written as JSON after its weights)
    cfg = SAEConfig(arch="matryoshka", d_in=np.int64(8), d_sae=np.int64(16), k=np.int32(4),
                    group_sizes=np.array([4, 12]))
    assert json.loads(json.dumps(cfg.to_dict()))["group_sizes"] == [4, 12] and type(cfg.d_in) is int
    # training takes rows: relu's loss of (B, T, d) summed over tokens, silently (others: torch's "mat1" error)
    for arch in ("relu", "topk"):
        sae = SparseAutoencoder(SAEConfig(arch=arch, d_in=8, d_sae=16, k=2), seed=0)
        with pytest.raises(UserError, match=r"training takes rows \(N, 8\), not a tensor of shape \(2, 3, 8\)"):
            sae.training_forward(torch.randn(2, 3, 8))


def test_both_transposed_products_equal_the_dense_one():
    """Z^T @ G: the CPU (CSC matmul) and the CUDA (scatter-add) paths against a dense product."""
    from sae_core.sparse_ops import _transposed_mm, codes_from_mask, scatter_transposed_mm

    g = torch.Generator().manual_seed(9)
    acts = F.relu(torch.randn(40, 30, generator=g))
    rows, cols = (acts > 1.0).nonzero(as_tuple=True)
    codes = codes_from_mask(rows, cols, 40, 30)
    values = acts[codes.row, codes.col]
    dense_Z = torch.zeros(40, 30)
    dense_Z[codes.row, codes.col] = values
    G = torch.randn(40, 7, generator=g)
    Z = torch.sparse_csr_tensor(codes.crow, codes.col, values, size=(40, 30), check_invariants=True)
    torch.testing.assert_close(_transposed_mm(Z, codes.row, codes.col, values, G, 30), dense_Z.t() @ G)
    torch.testing.assert_close(scatter_transposed_mm(codes.row, codes.col, values, G, 30), dense_Z.t() @ G)


def test_ties_at_the_cut_still_select_exactly_k_per_token_on_average():
    """bf16 compute rounds many activations onto the cut; exactly k*B entries must be kept."""
    g = torch.Generator().manual_seed(10)
    acts = F.relu(torch.randn(256, 512, generator=g)).bfloat16().float()
    codes, cut = batchtopk_codes(acts, k=8)
    assert codes.col.numel() == 8 * 256
    chosen = acts[codes.row, codes.col]
    assert (chosen >= cut).all()
    assert int((acts > cut).sum()) <= 8 * 256 < int((acts >= cut).sum())  # this batch does have ties


def test_calibrated_thresholds_are_the_mean_cut_of_the_batches_each_latent_fired_in():
    sae = make_sae("matryoshka")
    g = torch.Generator().manual_seed(11)
    batches = [torch.randn(200, D_IN, generator=g) * 2 for _ in range(5)]
    sae.calibrate_thresholds(batches)
    cuts, fired = [], []
    for x in batches:
        acts = F.relu(sae.pre_acts(x)).detach().double().numpy()
        cuts.append(np.sort(acts.ravel())[::-1][K * 200 - 1])
        fired.append(np_select("matryoshka", acts).any(0))
    cuts, fired = np.array(cuts), np.array(fired)
    expected = np.where(fired.any(0), (fired * cuts[:, None]).sum(0) / np.maximum(fired.sum(0), 1), cuts.mean())
    np.testing.assert_allclose(sae.threshold.numpy(), expected, rtol=1e-5)
    l0 = np.mean([(sae.encode(x) > 0).sum(1).float().mean().item() for x in batches])
    assert abs(l0 - K) < 0.1 * K
