"""Metrics against textbook formulas; checkpoint and SAELens export round trips."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_core.checkpoint import export_saelens, load_sae, save_sae
from sae_core.errors import UserError
from sae_core.metrics import MetricsAccumulator
from sae_core.sae import SAEConfig, SparseAutoencoder


def test_fvu_is_pooled_and_measured_about_the_mean():
    rng = np.random.default_rng(0)
    # Two batches with very different means: per-batch FVU averaging would give another number.
    x1 = rng.standard_normal((100, 8)) + 10
    x2 = rng.standard_normal((50, 8)) - 3
    xh1 = x1 + 0.3 * rng.standard_normal(x1.shape)
    xh2 = x2 + 0.6 * rng.standard_normal(x2.shape)
    acc = MetricsAccumulator(4)
    for x, xh in ((x1, xh1), (x2, xh2)):
        acc.update(torch.tensor(x), torch.tensor(xh), torch.zeros(len(x), 4))
    x, xh = np.vstack([x1, x2]), np.vstack([xh1, xh2])
    expected = ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    m = acc.compute()
    assert m["fvu"] == pytest.approx(expected, rel=1e-10)
    cos = (x * xh).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(xh, axis=1)
    assert m["mean_cosine"] == pytest.approx(cos.mean(), rel=1e-10)


def test_sparsity_metrics_and_reconstruction_bias():
    z = torch.zeros(20, 6)
    z[:, 0] = 1.0  # fires on 100%: dense
    z[:1, 1] = 2.0  # fires on 5%: neither dead nor dense
    z[:3, 2] = 1.0  # 15%: dense
    z[:2, 5] = 1.0  # exactly 10%: not dense (dense is more than 10%)
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    acc = MetricsAccumulator(6)
    acc.update(x, 0.5 * x, z)  # the SAE halves every input
    m = acc.compute()
    assert m["l0"] == pytest.approx((20 + 1 + 3 + 2) / 20)
    assert m["dead_fraction"] == pytest.approx(2 / 6)
    assert m["dense_fraction"] == pytest.approx(2 / 6)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5)
    # mse: the mean over rows of the squared error's sum over dimensions (the training loss's reconstruction term)
    assert m["mse"] == pytest.approx(float(((0.5 * x.double()) ** 2).sum(1).mean()), rel=1e-6)


def test_token_batches_are_rows_and_mismatched_shapes_change_nothing():
    """(B, T, d) batches, which the SAE encodes, were torch's broadcast error after half the sums had moved (a
    reviewer's accumulator went from 100 rows to 168 and FVU to NaN over two refused calls; until 2026-12-05): each
    token is a row, a vector one row, and shapes that are not one batch are refused before anything is added."""
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.standard_normal((6, 4, 3)))
    xh = x + 0.1 * torch.tensor(rng.standard_normal((6, 4, 3)))
    z = torch.tensor((rng.random((6, 4, 5)) < 0.3) * 1.0)
    tokens, flat = MetricsAccumulator(5), MetricsAccumulator(5)
    tokens.update(x, xh, z)
    tokens.update(x[0, 0], xh[0, 0], z[0, 0])  # one vector
    flat.update(torch.cat([x.reshape(24, 3), x[0, :1]]), torch.cat([xh.reshape(24, 3), xh[0, :1]]),
                torch.cat([z.reshape(24, 5), z[0, :1]]))
    assert tokens.compute() == pytest.approx(flat.compute(), rel=1e-12) and flat.compute()["rows"] == 25
    for bad in ((x, xh[:, :3], z), (x, xh, z[..., :4]), (x, xh, z[:, :3]), (x[0, 0, 0], xh[0, 0, 0], z[0, 0])):
        with pytest.raises(ValueError, match=r"are not one batch: give x and x_hat of one shape"):
            tokens.update(*bad)
    assert tokens.compute() == pytest.approx(flat.compute(), rel=1e-12)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka"])
def test_checkpoint_round_trip(tmp_path, arch):
    cfg = SAEConfig(arch=arch, d_in=12, d_sae=48, k=3, group_sizes=(8, 40) if arch == "matryoshka" else ())
    sae = SparseAutoencoder(cfg, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.threshold.uniform_(0, 0.5)
    save_sae(sae, tmp_path, training={"steps": 5})
    loaded = load_sae(tmp_path, d_in=12)
    assert loaded.cfg == cfg
    x = torch.randn(10, 12)
    torch.testing.assert_close(loaded(x), sae(x))
    tensors = load_file(str(tmp_path / "sae.safetensors"))
    assert tensors["W_enc"].shape == (12, 48) and tensors["W_dec"].shape == (48, 12)
    assert ("threshold" in tensors) == (arch in ("batchtopk", "matryoshka"))
    assert json.loads((tmp_path / "config.json").read_text())["training"] == {"steps": 5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_an_sae_of_another_dtype_is_saved_and_loaded_in_float32(tmp_path, dtype):
    """The file format is float32 whatever the dtype in memory (README): float64 weights rounded once, bf16
    ones exactly."""
    sae = SparseAutoencoder(SAEConfig(arch="topk", d_in=12, d_sae=48, k=3), seed=3).to(dtype)
    save_sae(sae, tmp_path)
    assert {t.dtype for t in load_file(str(tmp_path / "sae.safetensors")).values()} == {torch.float32}
    loaded = load_sae(tmp_path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(loaded, name).dtype == torch.float32
        assert torch.equal(getattr(loaded, name), getattr(sae, name).detach().float())


def test_equal_weights_give_equal_files_whatever_order_safetensors_writes_its_metadata(tmp_path, monkeypatch):
    """safetensors' metadata key order changes from process to process; save_sae's file must not."""
    import struct

    import sae_core.checkpoint as C

    def save_in_order(reverse):
        def save(tensors, path, metadata=None):
            save_file(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:  # the library's header, its metadata keys in the given order
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
                header["__metadata__"] = dict(sorted(header["__metadata__"].items(), reverse=reverse))
                f.seek(8)
                f.write(json.dumps(header, separators=(",", ":")).encode().ljust(n))
        return save

    sae = SparseAutoencoder(SAEConfig(arch="batchtopk", d_in=12, d_sae=48, k=3), seed=3)
    files = []
    for reverse in (False, True):
        monkeypatch.setattr(C, "save_file", save_in_order(reverse))
        save_sae(sae, tmp_path / str(reverse))
        files.append((tmp_path / str(reverse) / "sae.safetensors").read_bytes())
    assert files[0] == files[1]
    n = struct.unpack("<Q", files[0][:8])[0]
    assert list(json.loads(files[0][8:8 + n])["__metadata__"]) == ["format", "version"]
    torch.testing.assert_close(load_sae(tmp_path / "True")(torch.ones(2, 12)), sae(torch.ones(2, 12)))


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_saved_weights_are_as_readable_as_any_new_file(tmp_path, umask):
    """safetensors writes its files 0600: a trained SAE, its exports and the world's models could not be read by a
    teammate or an app running as another user, beside 0644 JSON files in the same folder. They get what a new
    file gets under the umask (the reference: a file opened here), no more: a private umask keeps them private."""
    import os
    import stat

    from sae_core.atomic import readable_as_new

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(umask)
    try:
        (tmp_path / "reference").write_text("")
        wanted = mode(tmp_path / "reference")
        sae = SparseAutoencoder(SAEConfig(arch="topk", d_in=12, d_sae=48, k=3), seed=3)
        save_sae(sae, tmp_path / "ours")
        export_saelens(tmp_path / "ours", tmp_path / "saelens")
        assert mode(tmp_path / "ours" / "sae.safetensors") == mode(tmp_path / "ours" / "config.json") == wanted
        assert mode(tmp_path / "saelens" / "sae_weights.safetensors") == wanted
        folder = tmp_path / "pretrained" / "sub"  # as save_pretrained leaves a world model's folder
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        assert mode(folder / "model.safetensors") == 0o600  # what safetensors does: the reason for all this
        readable_as_new(tmp_path / "pretrained")
        assert mode(folder / "model.safetensors") == wanted and not list(tmp_path.rglob(".mode.tmp*"))
    finally:
        os.umask(old)


def test_a_device_this_machine_lacks_is_one_sentence_when_loading_or_training(tmp_path):
    """load_sae(device="cuda") without a GPU, or a misspelt device, was torch's RuntimeError after the whole read;
    train_sae's at its first step. Both say it as every command does, before the work."""
    from sae_core.activation_store import ActivationStore
    from sae_core.training import TrainConfig, train_sae

    sae = SparseAutoencoder(SAEConfig(arch="topk", d_in=8, d_sae=16, k=2), seed=0)
    save_sae(sae, tmp_path / "sae")
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32))
    with pytest.raises(UserError, match=r"^device gpu is not a device this runs on; use auto, cpu, cuda or cuda:N\.$"):
        load_sae(tmp_path / "sae", device="gpu")
    with pytest.raises(UserError, match=r"^device gpu is not a device this runs on"):
        train_sae(ActivationStore(tmp_path / "acts.npy"), sae.cfg, TrainConfig(steps=2, batch_size=64), tmp_path / "o",
                  device="gpu")
    assert not (tmp_path / "o").exists()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible here"):
            load_sae(tmp_path / "sae", device="cuda")
    assert load_sae(tmp_path / "sae", device="auto").W_enc.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_wrong_width_fails_with_one_sentence_naming_both_sizes(tmp_path):
    save_sae(SparseAutoencoder(SAEConfig(arch="topk", d_in=12, d_sae=48, k=3)), tmp_path)
    with pytest.raises(UserError, match=r"width 12.*width 1024"):
        load_sae(tmp_path, d_in=1024)
    state = load_file(str(tmp_path / "sae.safetensors"))
    state["W_dec"] = torch.zeros(48, 13)
    save_file(state, str(tmp_path / "sae.safetensors"))
    with pytest.raises(UserError, match=r"W_dec has shape \(48, 13\).*\(48, 12\)"):
        load_sae(tmp_path)
    with pytest.raises(UserError, match="missing does not exist; give the path of an SAE folder"):
        load_sae(tmp_path / "missing")


@pytest.mark.parametrize("damage", ["truncated", "empty", "config {}", "unknown arch"])
def test_a_damaged_sae_folder_is_one_sentence(tmp_path, damage):
    """A copy cut short or a config from elsewhere: UserError naming the file, not safetensors' or the
    dataclass's exception."""
    save_sae(SparseAutoencoder(SAEConfig(arch="topk", d_in=12, d_sae=48, k=3)), tmp_path)
    weights, config = tmp_path / "sae.safetensors", tmp_path / "config.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:300])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "config {}":
        config.write_text("{}")
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), "arch": "gated"}))
    message = {"truncated": "sae.safetensors cannot be read", "empty": "sae.safetensors cannot be read",
               "config {}": "config.json is not an SAE config", "unknown arch": "unknown SAE architecture 'gated'"}
    with pytest.raises(UserError, match=message[damage]):
        load_sae(tmp_path)


def test_saelens_export_layout(tmp_path):
    sae = SparseAutoencoder(SAEConfig(arch="batchtopk", d_in=12, d_sae=48, k=3), seed=1)
    with torch.no_grad():
        sae.threshold.uniform_(0.1, 0.3)
    save_sae(sae, tmp_path / "sae")
    out = export_saelens(tmp_path / "sae", tmp_path / "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 12 and cfg["d_sae"] == 48
    w = load_file(str(out / "sae_weights.safetensors"))
    torch.testing.assert_close(w["threshold"], sae.threshold)
    # SAELens's JumpReLU formula on the exported tensors reproduces our encoder.
    x = torch.randn(7, 12)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z = torch.relu(pre) * (pre > w["threshold"])
    torch.testing.assert_close(z, sae.encode(x))
