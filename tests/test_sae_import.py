"""SAEs from SAELens, sparsify and dictionary_learning folders (local or on the Hub) against those libraries'
formulas, written out here from their inference code; refusals of what our SAE form cannot express."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_core.checkpoint import export_saelens, load_sae, save_sae, trained_on
from sae_core.errors import UserError
from sae_core.sae import SAEConfig, SparseAutoencoder

D_IN, D_SAE = 12, 40


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the inputs drawn in the tests, the same on every run


def _tensors(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / 3, "b_enc": torch.randn(D_SAE, generator=g) / 4,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g) / 2}
    return {k: v.to(dtype) for k, v in t.items()}


def _saelens(path, cfg: dict, tensors: dict):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
                                               **cfg}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _saelens_reference(cfg: dict, t: dict, x):
    """SAELens's encode/decode (sae_lens/saes/{standard,topk,jumprelu}_sae.py; for a BatchTopK or Matryoshka
    training checkpoint the jumprelu SAE its save_inference_model writes; the 3.x-5.x
    `finetuning_scaling_factor`, before 3.x `scaling_factor`), in float64 on the stored tensors, unfolded:
    with rescale_acts_by_decoder_norm the TopK family encodes act(pre * n) and decodes (z / n) @ W_dec."""
    t = {k: v.double() for k, v in t.items()}
    x = x.double()
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    training = arch in ("batchtopk", "matryoshka_batchtopk")
    n = t["W_dec"].norm(dim=1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", training) and (arch == "topk" or training)
    if rescale:
        pre = pre * n
    if arch == "topk" or cfg.get("activation_fn_str") == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    elif arch == "jumprelu" or training:
        threshold = t["topk_threshold"] if training else t["threshold"] if "threshold" in t else t["log_threshold"].exp()
        z = pre.relu() * (pre > threshold)
    else:
        z = pre.relu()
    factor = t.get("finetuning_scaling_factor", t.get("scaling_factor"))
    scaled = z * factor if factor is not None else z
    return z, (scaled / n if rescale else scaled) @ t["W_dec"] + t["b_dec"]


_G = torch.Generator().manual_seed(0)  # the cases' extra tensors, the same on every run
SAELENS_CASES = {
    "standard": ({"architecture": "standard"}, {}),
    "standard, b_dec not applied to the input": ({"architecture": "standard", "apply_b_dec_to_input": False}, {}),
    "topk (SAELens 6)": ({"architecture": "topk", "k": 5, "metadata": {"model_name": "m", "hook_name": "h"}}, {}),
    "topk (SAELens 3-5: standard + activation_fn_str)": (
        {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7}}, {}),
    "topk rescaling latents by decoder norms that are not 1": (
        {"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True}, {}),
    "topk rescaling, b_dec not applied to the input": (
        {"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}, {}),
    "jumprelu": ({"architecture": "jumprelu"}, {"threshold": torch.rand(D_SAE, generator=_G) * 0.6 - 0.1}),
    "jumprelu with the rescale flag (its config has no such field: SAELens drops it)": (
        {"architecture": "jumprelu", "rescale_acts_by_decoder_norm": True},
        {"threshold": torch.rand(D_SAE, generator=_G) * 0.6}),
    "jumprelu, training checkpoint (log_threshold)": ({"architecture": "jumprelu"},
                                                      {"log_threshold": torch.randn(D_SAE, generator=_G) - 1.5}),
    "batchtopk training checkpoint (topk_threshold, rescaling)": (
        {"architecture": "batchtopk", "k": 4, "rescale_acts_by_decoder_norm": True},
        {"topk_threshold": torch.tensor(1.5, dtype=torch.float64)}),
    "matryoshka training checkpoint (no rescaling)": (
        {"architecture": "matryoshka_batchtopk", "k": 4, "rescale_acts_by_decoder_norm": False,
         "matryoshka_widths": [8, 20, 40]}, {"topk_threshold": torch.tensor(0.4, dtype=torch.float64)}),
    "finetuning scaling factor (SAELens 3-5)": ({"architecture": "standard", "finetuning_scaling_factor": True},
                                                {"finetuning_scaling_factor": torch.rand(D_SAE, generator=_G) + 0.5}),
    "scaling factor (SAELens before 3)": ({"architecture": "standard"},
                                          {"scaling_factor": torch.rand(D_SAE, generator=_G) + 0.5}),
}


def _assert_same_computation(sae, x, z_ref, x_hat_ref):
    """Same active latents, the same codes and the same reconstruction as the reference; returns the codes."""
    with torch.no_grad():
        z = sae.encode(x)
        assert ((z != 0) == (z_ref != 0)).all()
        torch.testing.assert_close(z.double(), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(z).double(), x_hat_ref, atol=1e-4, rtol=1e-5)
    return z


@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_saelens_folders_load_as_the_same_computation(tmp_path, case):
    cfg, extra = SAELENS_CASES[case]
    tensors = {**_tensors(3), **extra}
    folder = _saelens(tmp_path / "s", cfg, tensors)
    sae = load_sae(folder)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    z = _assert_same_computation(sae, x, *_saelens_reference(cfg, tensors, x))
    assert (z != 0).any() and (z == 0).any()  # the case exercises both sides of the activation
    imported = sae.training_info["imported"]
    assert imported["format"] == "saelens" and imported["from"] == str(folder.resolve())
    # It goes on as one of ours: saved in our layout and read back, bit for bit.
    save_sae(sae, tmp_path / "ours", training=sae.training_info)
    back = load_sae(tmp_path / "ours")
    assert back.cfg == sae.cfg and back.training_info == sae.training_info
    with torch.no_grad():
        assert torch.equal(back.encode(x), z)


def test_bf16_saelens_weights_load_in_float32(tmp_path):
    cfg = {"architecture": "standard", "dtype": "bfloat16"}
    tensors = _tensors(4, torch.bfloat16)
    sae = load_sae(_saelens(tmp_path / "s", cfg, tensors))
    assert sae.W_enc.dtype == torch.float32
    x = torch.randn(16, D_IN)
    z_ref, _ = _saelens_reference(cfg, tensors, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), z_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,layer", [("batchtopk", "-2"), ("matryoshka", "-2"), ("batchtopk", "embed")])
def test_our_export_comes_back_unchanged(tmp_path, arch, layer):
    """export_saelens then load_sae: the SAE we saved comes back (arch, k, Matryoshka levels, the layer and
    tokens it read) with the same codes; the same file without our metadata, as an SAE SAELens made,
    is a jumprelu SAE with the same codes and no layer."""
    cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=3, group_sizes=(8, 12, 20) if arch == "matryoshka" else ())
    sae = SparseAutoencoder(cfg, seed=2)
    with torch.no_grad():
        sae.threshold.uniform_(0.05, 0.4)
        sae.b_enc.normal_(0, 0.3)
    model = {"spec": "world:/w:llava", "n_blocks": 4}  # what `precompute train` records of the extraction
    save_sae(sae, tmp_path / "ours", training={"activations": {"layer": layer, "tokens": "all", "model": model}})
    exported = export_saelens(tmp_path / "ours", tmp_path / "saelens")
    back = load_sae(exported)
    assert back.cfg == cfg
    assert back.training_info["activations"] == {"layer": layer, "tokens": "all", "model": {"spec": "world:/w:llava"}}
    raw = json.loads((exported / "cfg.json").read_text())
    assert raw["metadata"]["model_name"] == "world:/w:llava" and raw["metadata"]["hook_name"] == f"layer_{layer}"
    raw["metadata"] = {"model_name": "m", "hook_name": "h"}
    (exported / "cfg.json").write_text(json.dumps(raw))
    foreign = load_sae(exported)
    assert foreign.cfg.arch == "jumprelu" and "activations" not in foreign.training_info
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        assert (sae.encode(x) != 0).any()
        for other in (back, foreign):
            torch.testing.assert_close(other.encode(x), sae.encode(x))
            torch.testing.assert_close(other.decode(other.encode(x)), sae.decode(sae.encode(x)))


def test_metadata_that_does_not_fit_the_weights_leaves_a_jumprelu_sae(tmp_path):
    """Our export's metadata is believed only where it fits: groups that do not sum to the width, or no k,
    leave the plain jumprelu SAE the weights define."""
    tensors = {**_tensors(5), "threshold": torch.full((D_SAE,), 0.1)}
    for meta in ({"sae_lab_arch": "matryoshka", "sae_lab_k": 3, "sae_lab_group_sizes": [8, 8]},
                 {"sae_lab_arch": "batchtopk"}, {"sae_lab_arch": "batchtopk", "sae_lab_k": 0}):
        folder = _saelens(tmp_path / str(len(list(tmp_path.iterdir()))), {"architecture": "jumprelu",
                                                                         "metadata": meta}, tensors)
        assert load_sae(folder).cfg.arch == "jumprelu"


@pytest.mark.parametrize("hook,layer", [
    ("layer_-2", "-2"), ("layer_7", "7"),                                # our export
    ("blocks.9.hook_resid_post", "9"),                                   # TransformerLens / ViT-Prisma
    ("blocks.9.hook_resid_pre", "8"), ("blocks.0.hook_resid_pre", None),  # block 8's output; the embeddings
    ("blocks.9.hook_mlp_out", None), ("blocks.9.attn.hook_z", None), (None, None),
])
def test_the_layer_of_a_saelens_hook(tmp_path, hook, layer):
    """A SAELens SAE on a block's output records that layer, in our numbering (block L's output is layer
    L), so the atlas and steering need no --layer; any other hook needs one, and the refusal names it."""
    from sae_core.checkpoint import no_layer_reason

    folder = _saelens(tmp_path / "s", {"architecture": "standard", "metadata": {"hook_name": hook}}, _tensors(6))
    sae = load_sae(folder)
    assert sae.training_info.get("activations", {}).get("layer") == layer
    if layer is None and hook is not None:
        assert no_layer_reason(sae, folder) == (f"the SAE in {folder} reads {hook!r}, which names no block output "
                                                "(residual stream) this tool can find by itself")


@pytest.mark.parametrize("cfg,extra,match", [
    ({"architecture": "gated"}, {}, "'gated' SAE; only standard, topk and jumprelu"),
    ({"architecture": "standard", "activation_fn_str": "tanh-relu"}, {}, "activation 'tanh-relu'; only relu and topk"),
    ({"architecture": "standard", "normalize_activations": "expected_average_only_in"}, {},
     "fold_activation_norm_scaling_factor"),
    ({"architecture": "standard", "normalize_activations": "constant_norm_rescale"}, {}, "no fixed weights"),
    ({"architecture": "standard", "reshape_activations": "hook_z"}, {}, "attention-head"),
    ({"architecture": "standard", "normalize_activations": True}, {},
     r"scaled by a constant that is not in its weights \(normalize_activations True\).*activation_scaler.json"),
    ({"architecture": "standard", "normalize_activations": "covariance_whitening"}, {},
     "has no activation_whitening.safetensors beside it; fold the whitening in with SAELens's"),
    ({"architecture": "standard", "hook_name": "blocks.5.attn.hook_z"}, {}, "attention-head"),   # before SAELens 6
    ({"architecture": "standard", "hook_point": "blocks.5.attn.hook_z"}, {}, "attention-head"),
    ({"architecture": "jumprelu"}, {},  # with what to do since 2026-12-06
     "has no tensor 'threshold', which a SAELens jumprelu SAE needs; the file is incomplete or from another tool: "
     "download or export it again.$"),
    ({"architecture": "topk"}, {}, "no whole number k"),
    ({"architecture": "topk", "k": 2.5}, {}, "no whole number k"),
    ({"architecture": "topk", "k": 4}, {"topk_threshold": torch.tensor(0.5)}, "a tensor 'topk_threshold' that a SAELens"),
    ({"architecture": "batchtopk", "k": 4}, {}, "has no tensor 'topk_threshold'"),
    ({"architecture": "matryoshka_batchtopk", "k": 4, "matryoshka_widths": [20, 10, 40]},
     {"topk_threshold": torch.tensor(0.5)}, "are not increasing whole widths up to the SAE width 40"),
])
def test_saelens_forms_we_cannot_express_are_refused(tmp_path, cfg, extra, match):
    folder = _saelens(tmp_path / "s", cfg, {**_tensors(5), **extra})
    with pytest.raises(UserError, match=match):
        load_sae(folder)


def test_saelens_hooks_before_6_are_read_from_the_top_level(tmp_path):
    """Before SAELens 6 the hook sat at the top level of cfg.json, before 3 under `hook_point` (SAELens's
    loader renames it to hook_name); a block output there records its layer."""
    for key in ("hook_name", "hook_point"):
        sae = load_sae(_saelens(tmp_path / key, {"architecture": "standard", key: "blocks.8.hook_resid_post",
                                                 "model_name": "gpt2"}, _tensors(6)))
        assert sae.training_info["activations"]["layer"] == "8"
        assert sae.training_info["imported"]["hook"] == "blocks.8.hook_resid_post"
        assert sae.training_info["imported"]["model"] == "gpt2"


def test_bf16_topk_rescaling_saes_load_folded_or_not(tmp_path):
    """SAELens's fold_W_dec_norm in bf16 leaves rows whose norms are up to a few 1e-3 off 1 and keeps
    rescale_acts_by_decoder_norm; both that and the unfolded bf16 SAE load as SAELens computes them."""
    t = _tensors(6, torch.bfloat16)
    folded = {**t, "W_dec": (t["W_dec"].float() / t["W_dec"].float().norm(dim=1, keepdim=True)).bfloat16()}
    assert (folded["W_dec"].float().norm(dim=1) - 1).abs().max() > 1e-4   # what the old check refused
    cfg = {"architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": True, "dtype": "bfloat16"}
    x = torch.randn(64, D_IN) * 2
    for name, tensors in (("plain", t), ("folded", folded)):
        sae = load_sae(_saelens(tmp_path / name, cfg, tensors))
        _assert_same_computation(sae, x, *_saelens_reference(cfg, tensors, x))
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))   # folded: unit rows, as ours


def test_saelens_training_checkpoints_keep_k_and_the_matryoshka_levels(tmp_path):
    cfg, extra = SAELENS_CASES["matryoshka training checkpoint (no rescaling)"]
    sae = load_sae(_saelens(tmp_path / "m", cfg, {**_tensors(3), **extra}))
    assert sae.cfg.arch == "matryoshka" and sae.cfg.group_sizes == (8, 12, 20) and sae.cfg.k == 4
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.4))
    # a width list without the full width: SAELens adds it; a fractional average k leaves a jumprelu SAE
    sae = load_sae(_saelens(tmp_path / "m2", {**cfg, "matryoshka_widths": [8, 20], "k": 3.5}, {**_tensors(3), **extra}))
    assert sae.cfg.arch == "jumprelu"
    sae = load_sae(_saelens(tmp_path / "m3", {**cfg, "matryoshka_widths": [8, 20]}, {**_tensors(3), **extra}))
    assert sae.cfg.group_sizes == (8, 12, 20)
    cfg, extra = SAELENS_CASES["batchtopk training checkpoint (topk_threshold, rescaling)"]
    assert load_sae(_saelens(tmp_path / "b", cfg, {**_tensors(3), **extra})).cfg.arch == "batchtopk"
    # save_inference_model's jumprelu form keeps the training config in its metadata: k and levels come back
    tensors = {**_tensors(3), "threshold": torch.full((D_SAE,), 0.4)}
    for details, expected in (({"k": 4, "matryoshka_widths": [8, 20, 40]}, ("matryoshka", (8, 12, 20))),
                              ({"k": 4.5, "matryoshka_widths": [8, 20, 40]}, ("jumprelu", ())),
                              ({"k": 4, "matryoshka_widths": [20, 8]}, ("jumprelu", ()))):
        meta = {"training_architecture": "matryoshka_batchtopk", "training_architecture_details": details}
        sae = load_sae(_saelens(tmp_path / f"inf{len(list(tmp_path.iterdir()))}",
                                {"architecture": "jumprelu", "metadata": meta}, tensors))
        assert (sae.cfg.arch, sae.cfg.group_sizes) == expected


def _sparsify(path, cfg: dict, tensors: dict):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "normalize_decoder": True, "num_latents": 0,
                                               "multi_topk": False, "skip_connection": False, "d_in": D_IN, **cfg}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae.safetensors"))
    return path


def _sparsify_tensors(seed: int) -> dict:
    t = _tensors(seed)
    return {"encoder.weight": t["W_enc"].t(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}


def test_sparsify_folder_loads_as_the_same_computation(tmp_path):
    t = _sparsify_tensors(7)
    sae = load_sae(_sparsify(tmp_path / "s", {"k": 6}, t))
    assert sae.cfg.arch == "topk" and sae.cfg.k == 6 and sae.training_info["imported"]["format"] == "sparsify"
    x = torch.randn(40, D_IN) * 2
    # sparsify: pre = ReLU(encoder(x - b_dec)), keep the top k; decode = sum of acts * W_dec rows + b_dec
    pre = torch.nn.functional.linear(x.double() - t["b_dec"].double(), t["encoder.weight"].double(),
                                     t["encoder.bias"].double()).relu()
    top = pre.topk(6, dim=-1)
    x_hat_ref = torch.einsum("bk,bkd->bd", top.values, t["W_dec"].double()[top.indices]) + t["b_dec"].double()
    with torch.no_grad():
        z = sae.encode(x)
        torch.testing.assert_close(z.double().gather(1, top.indices), top.values, atol=1e-5, rtol=1e-5)
        assert int((z != 0).sum()) == int((top.values > 0).sum())
        torch.testing.assert_close(sae.decode(z).double(), x_hat_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cfg,extra,match", [
    ({"k": 4, "transcode": True}, {}, "transcoder"),
    ({"k": 4, "activation": "groupmax"}, {}, "'groupmax' activation"),
    ({"k": 4}, {"W_skip": torch.zeros(D_IN, D_IN)}, r"skip connection \(W_skip\), which this SAE form cannot express; "
                                                     "train or export one without it.$"),
    ({"k": 0}, {}, "no k between 1 and 40"),
])
def test_sparsify_forms_we_cannot_express_are_refused(tmp_path, cfg, extra, match):
    folder = _sparsify(tmp_path / "s", cfg, {**_sparsify_tensors(8), **extra})
    with pytest.raises(UserError, match=match):
        load_sae(folder)


def test_a_folder_of_no_known_layout_is_refused_with_the_layouts(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "cfg.json").write_text("{}")
    with pytest.raises(UserError, match="sae_weights.safetensors"):
        load_sae(tmp_path / "x")


def test_hub_specs_fetch_only_the_sae_folder(tmp_path, monkeypatch):
    """hf:OWNER/REPO/FOLDER asks the Hub for that folder's SAE files and loads what arrives; a failed
    fetch is one sentence. (No network here: snapshot_download is replaced by a fake cache.)"""
    import huggingface_hub

    cfg, extra = SAELENS_CASES["jumprelu"]
    tensors = {**_tensors(9), **extra}
    _saelens(tmp_path / "cache" / "layers.7", cfg, tensors)
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        if repo_id != "someone/vit-saes":
            raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error: Repository Not Found")
        return str(tmp_path / "cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    sae = load_sae("hf:someone/vit-saes/layers.7")
    assert sae.training_info["imported"]["from"] == "hf:someone/vit-saes/layers.7"   # the spec, not the cache
    assert calls[0][0] == "someone/vit-saes"
    assert all(p.startswith("layers.7/") for p in calls[0][1]) and "layers.7/cfg.json" in calls[0][1]
    x = torch.randn(8, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), _saelens_reference(cfg, tensors, x)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="cannot fetch the SAE hf:nobody/nothing from the Hugging Face Hub"):
        load_sae("hf:nobody/nothing")
    with pytest.raises(UserError, match="does not name a Hub repository"):
        load_sae("hf:justone")
    # a dictionary_learning folder saved as ae.pt: the pickle is not asked for, and the refusal says how
    # to convert it where it is trusted
    assert not any(p.endswith("ae.pt") for p in calls[0][1])
    (tmp_path / "cache" / "trainer_0").mkdir()
    (tmp_path / "cache" / "trainer_0" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    with pytest.raises(UserError, match=r"hf:someone/vit-saes/trainer_0 is a dictionary_learning SAE without "
                                        r"ae.safetensors; its weights are most likely ae.pt, a pickle, .*weights_only=True"):
        load_sae("hf:someone/vit-saes/trainer_0")


def test_imported_architectures_are_not_trained():
    sae = SparseAutoencoder(SAEConfig(arch="jumprelu", d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(UserError, match="cannot be trained here"):
        sae.training_forward(torch.randn(4, D_IN))


def test_export_command_imports_into_our_layout(tmp_path):
    """`precompute export SPARSIFY_DIR --format sae-lab` writes our layout, which loads without the source."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    src = _sparsify(tmp_path / "s", {"k": 5}, _sparsify_tensors(10))
    expected = load_sae(src)
    proc = subprocess.run([sys.executable, "-m", "precompute", "export", str(src), "--format", "sae-lab", "--out",
                           str(tmp_path / "ours")], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.rmtree(src)
    back = load_sae(tmp_path / "ours")
    assert back.cfg == expected.cfg and back.training_info["imported"]["format"] == "sparsify"
    x = torch.randn(10, D_IN)
    with torch.no_grad():
        assert torch.equal(back.encode(x), expected.encode(x))


def _dictionary_learning(path, dict_class: str, tensors: dict, weights: str = "ae.safetensors", **trainer):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, "lm_name": "clip",
                                                              "layer": 22, "submodule_name": "resid_22", **trainer}}))
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / weights))
    else:
        (path / weights).write_bytes(b"not read")
    return path


DL_CASES = {
    # dictionary_learning 0.1.0: trainers/matryoshka_batch_top_k.py, trainers/batch_top_k.py, trainers/top_k.py,
    # dictionary.py (AutoEncoder); threshold -1 is the value before the trainer first sets it.
    "MatryoshkaBatchTopKSAE": lambda t: {**t, "threshold": torch.tensor(0.3), "k": torch.tensor(4, dtype=torch.int32),
                                         "group_sizes": torch.tensor([8, 12, 20])},
    "BatchTopKSAE": lambda t: {"encoder.weight": t["W_enc"].t(), "encoder.bias": t["b_enc"],
                               "decoder.weight": t["W_dec"].t(), "b_dec": t["b_dec"], "threshold": torch.tensor(-1.0),
                               "k": torch.tensor(4, dtype=torch.int32)},
    "AutoEncoderTopK": lambda t: {"encoder.weight": t["W_enc"].t(), "encoder.bias": t["b_enc"],
                                  "decoder.weight": t["W_dec"].t(), "b_dec": t["b_dec"], "threshold": torch.tensor(0.5),
                                  "k": torch.tensor(6, dtype=torch.int32)},
    "AutoEncoder": lambda t: {"encoder.weight": t["W_enc"].t(), "encoder.bias": t["b_enc"],
                              "decoder.weight": t["W_dec"].t(), "bias": t["b_dec"]},
    "JumpReluAutoEncoder": lambda t: {**t, "threshold": torch.rand(D_SAE, generator=torch.Generator().manual_seed(4))},
}


def _dictionary_learning_reference(dict_class: str, t: dict, x):
    t = {k: v.double() for k, v in t.items()}
    x = x.double()
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
        z = post * (post > t["threshold"])
        return z, z @ t["W_dec"] + t["b_dec"]
    if dict_class == "JumpReluAutoEncoder":  # dictionary.py: apply_b_dec_to_input False, never saved
        pre = x @ t["W_enc"] + t["b_enc"]
        z = (pre * (pre > t["threshold"])).relu()
        return z, z @ t["W_dec"] + t["b_dec"]
    b_dec = t["bias"] if dict_class == "AutoEncoder" else t["b_dec"]
    post = torch.nn.functional.linear(x - b_dec, t["encoder.weight"], t["encoder.bias"]).relu()
    if dict_class == "BatchTopKSAE":
        z = post * (post > t["threshold"])
    elif dict_class == "AutoEncoderTopK":          # encode() without use_threshold: top k per row
        top = post.topk(int(t["k"]), dim=-1)
        z = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    else:
        z = post
    return z, torch.nn.functional.linear(z, t["decoder.weight"]) + b_dec


@pytest.mark.parametrize("dict_class", list(DL_CASES))
def test_dictionary_learning_folders_load_as_the_same_computation(tmp_path, dict_class):
    tensors = DL_CASES[dict_class](_tensors(11))
    sae = load_sae(_dictionary_learning(tmp_path / "d", dict_class, tensors))
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2)) * 2
    z_ref, x_hat_ref = _dictionary_learning_reference(dict_class, tensors, x)
    z = _assert_same_computation(sae, x, z_ref, x_hat_ref)
    assert (z != 0).any() and (z == 0).any()
    imported = sae.training_info["imported"]
    assert imported["format"] == "dictionary_learning" and imported["architecture"] == dict_class
    assert imported["layer"] == 22 and imported["hook"] == "resid_22"
    if dict_class == "AutoEncoderTopK":  # older releases: k an attribute (in the trainer's config), no threshold
        old = {n: v for n, v in tensors.items() if n not in ("k", "threshold")}
        back = load_sae(_dictionary_learning(tmp_path / "old", dict_class, old, k=int(tensors["k"])))
        with torch.no_grad():
            torch.testing.assert_close(back.encode(x).double(), z_ref, atol=1e-5, rtol=1e-5)
    if dict_class == "MatryoshkaBatchTopKSAE":      # the Matryoshka levels survive: the atlas draws its tree from them
        assert sae.cfg.arch == "matryoshka" and sae.cfg.group_sizes == (8, 12, 20) and sae.cfg.k == 4


def test_dictionary_learning_pickles_are_not_read(tmp_path):
    folder = _dictionary_learning(tmp_path / "d", "BatchTopKSAE", {}, weights="ae.pt")
    with pytest.raises(UserError, match=r"a pickle, which this tool does not read; .*torch.load\(.*weights_only=True"):
        load_sae(folder)
    folder = _dictionary_learning(tmp_path / "g", "GatedAutoEncoder", {"x": torch.zeros(1)})
    with pytest.raises(UserError, match="'GatedAutoEncoder'; only MatryoshkaBatchTopKSAE"):
        load_sae(folder)


def test_export_metadata_survives_saelens_6(tmp_path):
    """SAELens >= 6 (`handle_config_defaulting`) reads a cfg.json with no sae_lens_version of 6 or more,
    top level or in metadata, as a pre-6.0 one and rebuilds metadata from top-level keys only: the model,
    the hook and our keys would all be lost. The export must carry such a version."""
    sae = SparseAutoencoder(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=4), seed=1)
    save_sae(sae, tmp_path / "ours", training={"activations": {"layer": "-2", "tokens": "all",
                                                                "model": {"spec": "world:/w:llava"}}})
    raw = json.loads((export_saelens(tmp_path / "ours", tmp_path / "saelens") / "cfg.json").read_text())
    version = raw.get("sae_lens_version") or raw["metadata"].get("sae_lens_version")
    assert version is not None and int(str(version).split(".")[0]) >= 6
    assert raw["metadata"]["model_name"] == "world:/w:llava" and raw["metadata"]["hook_name"] == "layer_-2"


SAELENS5_REQUIRED = ("context_size", "model_name", "hook_name", "hook_layer", "hook_head_index", "dataset_path")
"""The positional fields of SAELens 5.11.0's SAEConfig that have no default (its TypeError on our export
before it wrote them: "missing 6 required positional arguments")."""


def _saelens5_reference(cfg: dict, t: dict, x):
    """SAELens 5.x's SAE (5.11.0, sae_lens/sae.py) from the top-level keys alone, as it reads them (it knows
    no "metadata" and no top-level "k"): jumprelu keeps pre where pre > threshold; any other architecture
    applies the activation `activation_fn_str` names (relu, or topk with activation_fn_kwargs["k"])."""
    t = {k: v.double() for k, v in t.items()}
    pre = (x.double() - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "jumprelu":
        z = pre.relu() * (pre > t["threshold"])
    elif cfg["activation_fn_str"] == "topk":
        top = pre.topk(cfg["activation_fn_kwargs"]["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        assert cfg["activation_fn_str"] == "relu"
        z = pre.relu()
    return z, z @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka"])
def test_our_export_loads_in_saelens_5_as_the_same_computation(tmp_path, arch):
    """SAELens 5.x refused our export (SAEConfig missing 6 required arguments), and read the activation from
    top-level keys that were not there. It now carries them beside SAELens 6's metadata (checked once with
    the real 5.11.0 and 6.54.12: both load it, with equal codes, within 1e-6 of ours)."""
    cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=3, group_sizes=(8, 12, 20) if arch == "matryoshka" else ())
    sae = SparseAutoencoder(cfg, seed=4)
    with torch.no_grad():
        sae.threshold.uniform_(0.05, 0.4)
        sae.b_enc.normal_(0, 0.3)
    save_sae(sae, tmp_path / "ours", training={"activations": {"layer": "-2", "tokens": "all",
                                                                "model": {"spec": "world:/w:llava"}}})
    exported = export_saelens(tmp_path / "ours", tmp_path / "saelens")
    raw = json.loads((exported / "cfg.json").read_text())
    assert all(key in raw for key in SAELENS5_REQUIRED) and isinstance(raw["hook_name"], str)
    assert raw["hook_layer"] == -2 and raw["model_name"] == "world:/w:llava"
    top_level = {k: v for k, v in raw.items() if k not in ("metadata", "k")}
    x = torch.randn(40, D_IN)
    z_ref, x_hat_ref = _saelens5_reference(top_level, load_file(str(exported / "sae_weights.safetensors")), x)
    assert (z_ref != 0).any()
    _assert_same_computation(sae, x, z_ref, x_hat_ref)


def _dl_tensors(seed: int) -> dict:
    return DL_CASES["BatchTopKSAE"](_tensors(seed))


@pytest.mark.parametrize("layout,name", [("saelens", "W_enc"), ("saelens", "b_dec"), ("sparsify", "encoder.weight"),
                                         ("dictionary_learning", "threshold"), ("sae-lab", "W_dec")])
def test_weights_with_nan_or_inf_are_refused(tmp_path, layout, name):
    """A NaN latent wins every top-k and an infinite bias fires the same latents on every input: refused in
    one sentence naming the tensor, the file and the count, whatever the layout."""
    if layout == "saelens":
        t = _tensors(3)
        t[name][1] = float("nan")
        t[name][2] = float("inf")
        folder, weights = _saelens(tmp_path / "s", {"architecture": "topk", "k": 4}, t), "sae_weights.safetensors"
        count = 2 * (D_SAE if name == "W_enc" else 1)
    elif layout == "sparsify":
        t = _sparsify_tensors(3)
        t[name][0, 0] = float("-inf")
        folder, weights, count = _sparsify(tmp_path / "s", {"k": 4}, t), "sae.safetensors", 1
    elif layout == "dictionary_learning":
        t = _dl_tensors(3)
        t[name] = torch.tensor(float("nan"))
        folder, weights, count = _dictionary_learning(tmp_path / "d", "BatchTopKSAE", t), "ae.safetensors", 1
    else:
        save_sae(SparseAutoencoder(SAEConfig(arch="relu", d_in=D_IN, d_sae=D_SAE)), tmp_path / "o")
        from safetensors.torch import load_file
        t = load_file(str(tmp_path / "o" / "sae.safetensors"))
        t[name][3, :] = float("nan")
        save_file(t, str(tmp_path / "o" / "sae.safetensors"))
        folder, weights, count = tmp_path / "o", "sae.safetensors", D_IN
    with pytest.raises(UserError) as e:
        load_sae(folder)
    assert str(e.value).startswith(f"{name} in {folder / weights} holds NaN or infinite values ({count} of ")
    assert str(e.value).count(". ") == 0 and "training diverged" in str(e.value)


def _tree(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_never_writes_over_its_source_or_another_layout(tmp_path):
    """Our layout shares file names with sparsify (sae.safetensors) and dictionary_learning (config.json):
    an export into the source folder, or into a folder holding another layout whose files it would
    replace, is refused in one sentence and leaves every file as it was."""
    import subprocess
    import sys
    from pathlib import Path

    from sae_core.checkpoint import export_sae_lab

    sparsify = _sparsify(tmp_path / "sp", {"k": 4}, _sparsify_tensors(3))
    dl = _dictionary_learning(tmp_path / "dl", "BatchTopKSAE", _dl_tensors(3))
    saelens = _saelens(tmp_path / "sl", {"architecture": "standard"}, _tensors(3))
    before = {f: _tree(f) for f in (sparsify, dl, saelens)}
    proc = subprocess.run([sys.executable, "-m", "precompute", "export", str(sparsify), "--format", "sae-lab",
                           "--out", str(sparsify)], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"--out {sparsify} is the SAE folder being exported; give another folder" in proc.stderr
    for src, out, fmt, match in [
            (dl, dl, "sae-lab", "is the SAE folder being exported"),
            (saelens, saelens, "saelens", "is the SAE folder being exported"),
            (saelens, sparsify, "sae-lab", "holds a sparsify SAE; writing the sae-lab layout there would replace"),
            (saelens, dl, "sae-lab", "holds a dictionary_learning SAE; writing the sae-lab layout"),
            (dl, sparsify, "saelens", "holds a sparsify SAE; writing the saelens layout"),
            # no file name shared, but two SAEs in one folder: the one `load_sae` picks hid the other (the
            # dictionary_learning SAE, or ours, which is looked for first, hid the new export)
            (sparsify, dl, "saelens", "holds a dictionary_learning SAE; writing the saelens layout"),
            (dl, saelens, "sae-lab", "holds a saelens SAE; writing the sae-lab layout")]:
        with pytest.raises(UserError, match=match + ("" if out == src else r".* or leave two SAEs in one folder, of "
                                                     "which only one loads; give another folder for the output.$")):
            (export_sae_lab if fmt == "sae-lab" else export_saelens)(src, out)
    ours = tmp_path / "ours"
    save_sae(SparseAutoencoder(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=3)), ours)
    with pytest.raises(UserError, match="holds a sae-lab SAE; writing the saelens layout"):
        export_saelens(saelens, ours)
    assert {f: _tree(f) for f in (sparsify, dl, saelens)} == before
    # an export into a folder of the same layout (a rerun) or a new one goes ahead
    export_saelens(sparsify, tmp_path / "again")
    export_saelens(dl, tmp_path / "again")
    assert load_sae(tmp_path / "again").cfg.arch == "batchtopk"  # the second export replaced the first


def test_sae_lab_export_of_our_own_folder_keeps_its_metrics(tmp_path):
    from sae_core.checkpoint import export_sae_lab

    save_sae(SparseAutoencoder(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=3)), tmp_path / "o")
    (tmp_path / "o" / "metrics.json").write_text('{"fvu": 0.1}')
    export_sae_lab(tmp_path / "o", tmp_path / "copy")
    assert _tree(tmp_path / "copy") == _tree(tmp_path / "o")


def test_an_export_over_an_sae_of_ours_leaves_none_of_its_files(tmp_path):
    """An imported SAE written over one of ours takes the folder whole: the old metrics.json stayed (the
    import has none) and `inspect` showed the old SAE's held-out figures beside the new architecture."""
    from sae_core.checkpoint import export_sae_lab

    old = SparseAutoencoder(SAEConfig(arch="matryoshka", d_in=D_IN, d_sae=D_SAE, k=3, group_sizes=(8, 32)))
    save_sae(old, tmp_path / "o")
    (tmp_path / "o" / "metrics.json").write_text('{"fvu": 0.1}')
    sparsify = _sparsify(tmp_path / "sp", {"k": 4}, _sparsify_tensors(3))
    export_sae_lab(sparsify, tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "sae.safetensors"]
    export_sae_lab(sparsify, tmp_path / "fresh")
    assert _tree(tmp_path / "o") == _tree(tmp_path / "fresh")
    # one of ours without metrics.json over one with it: the copy is the source, file for file
    save_sae(old, tmp_path / "plain")
    (tmp_path / "o" / "metrics.json").write_text('{"fvu": 0.1}')
    export_sae_lab(tmp_path / "plain", tmp_path / "o")
    assert _tree(tmp_path / "o") == _tree(tmp_path / "plain")


def _bad(tensors: dict, **changes) -> dict:
    return {**tensors, **changes}


_T = _tensors(12)
MALFORMED = {
    # layout, files' content, what the sentence says; each of these ended in a traceback before
    "saelens W_enc 1-D": ("saelens", {"architecture": "standard"}, _bad(_T, W_enc=_T["W_enc"].reshape(-1)),
                          "W_enc has shape (480,), not a matrix"),
    "saelens b_dec of another length, not applied to the input": (
        "saelens", {"architecture": "standard", "apply_b_dec_to_input": False}, _bad(_T, b_dec=torch.zeros(D_IN + 1)),
        "b_dec has shape (13,) but the SAE's weight matrices need (12,)"),
    "saelens W_dec 1-D, rescaling": ("saelens", {"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True},
                                     _bad(_T, W_dec=torch.ones(D_SAE)), "W_dec has shape (40,) but"),
    "saelens finetuning_scaling_factor of another length": (
        "saelens", {"architecture": "standard"}, _bad(_T, finetuning_scaling_factor=torch.ones(D_SAE + 1)),
        "finetuning_scaling_factor has shape (41,)"),
    "sparsify encoder.weight 3-D": ("sparsify", {"k": 4}, _bad(_sparsify_tensors(12), **{
        "encoder.weight": torch.zeros(1, D_SAE, D_IN)}), "encoder.weight has shape (1, 40, 12), not a matrix"),
    "dictionary_learning k with 2 elements": ("BatchTopKSAE", {}, _bad(DL_CASES["BatchTopKSAE"](_T),
                                              k=torch.tensor([4, 4])), "give no whole number k between 1 and 40"),
    "dictionary_learning group_sizes 0-d": ("MatryoshkaBatchTopKSAE", {}, _bad(DL_CASES["MatryoshkaBatchTopKSAE"](_T),
                                            group_sizes=torch.tensor(40)), "are not positive whole sizes summing to"),
    "dictionary_learning encoder.weight 1-D": ("AutoEncoder", {}, _bad(DL_CASES["AutoEncoder"](_T), **{
        "encoder.weight": torch.zeros(D_IN * D_SAE)}), "encoder.weight has shape (480,), not a matrix"),
    "dictionary_learning threshold of 3 values": ("BatchTopKSAE", {}, _bad(DL_CASES["BatchTopKSAE"](_T),
                                                  threshold=torch.zeros(3)), "has one threshold"),
    "dictionary_learning AutoEncoderTopK, k null and no k tensor": (
        "AutoEncoderTopK", {"k": None}, {n: v for n, v in DL_CASES["AutoEncoderTopK"](_T).items() if n != "k"},
        "has no tensor 'k', which dictionary_learning's AutoEncoderTopK saves"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_foreign_tensors_are_one_sentence(tmp_path, case):
    layout, cfg, tensors, match = MALFORMED[case]
    if layout == "saelens":
        folder = _saelens(tmp_path / "s", cfg, tensors)
    elif layout == "sparsify":
        folder = _sparsify(tmp_path / "s", cfg, tensors)
    else:
        folder = _dictionary_learning(tmp_path / "d", layout, tensors, **cfg)
    with pytest.raises(UserError, match=re.escape(match)):
        load_sae(folder)


def test_a_dictionary_learning_config_without_a_trainer_object_is_one_sentence(tmp_path):
    folder = _dictionary_learning(tmp_path / "d", "AutoEncoder", DL_CASES["AutoEncoder"](_T))
    for trainer, shown in ((["AutoEncoder"], '["AutoEncoder"]'), (None, "null"), ("x" * 50, '"' + "x" * 36 + "...")):
        (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
        with pytest.raises(UserError) as e:
            load_sae(folder)
        assert str(e.value) == (f'{folder / "config.json"} has no "trainer" object (its "trainer" is {shown}), which '
                                "dictionary_learning writes; the config is damaged or from another tool: export the SAE "
                                "from dictionary_learning again.")


def test_a_dictionary_learning_per_latent_threshold_applies_per_latent(tmp_path):
    tensors = {**DL_CASES["BatchTopKSAE"](_T), "threshold": torch.rand(D_SAE, generator=torch.Generator().manual_seed(5))}
    sae = load_sae(_dictionary_learning(tmp_path / "d", "BatchTopKSAE", tensors))
    x = torch.randn(64, D_IN) * 2
    _assert_same_computation(sae, x, *_dictionary_learning_reference("BatchTopKSAE", tensors, x))


@pytest.mark.parametrize("field,value", [("d_in", 12.0), ("d_sae", None), ("k", "3"), ("group_sizes", [20.0, 20.0])])
def test_our_config_with_a_size_that_is_not_a_whole_number_is_one_sentence(tmp_path, field, value):
    save_sae(SparseAutoencoder(SAEConfig(arch="matryoshka", d_in=D_IN, d_sae=D_SAE, k=3, group_sizes=(20, 20))),
             tmp_path / "o")
    raw = json.loads((tmp_path / "o" / "config.json").read_text())
    raw[field] = value
    (tmp_path / "o" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=rf"is not an SAE config this tool wrote \({field} is .*, not a "):
        load_sae(tmp_path / "o")


def test_wrong_paths_say_what_is_wrong(tmp_path, monkeypatch):
    save_sae(SparseAutoencoder(SAEConfig(arch="relu", d_in=D_IN, d_sae=D_SAE)), tmp_path / "o")
    with pytest.raises(UserError, match=r"nope does not exist; give the path of an SAE folder"):
        load_sae(tmp_path / "nope")
    with pytest.raises(UserError, match=rf"sae.safetensors is a file; give the folder that holds it \({tmp_path / 'o'}\)"):
        load_sae(tmp_path / "o" / "sae.safetensors")
    import huggingface_hub

    (tmp_path / "cache" / "empty").mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"^hf:someone/saes/layer.3 has none of the files of an SAE folder"):
        load_sae("hf:someone/saes/layer.3")
    (tmp_path / "cache" / "half").mkdir()
    (tmp_path / "cache" / "half" / "cfg.json").write_text("{}")   # its weights not in the repository
    with pytest.raises(UserError, match=r"^hf:someone/saes/half is not a finished SAE directory"):
        load_sae("hf:someone/saes/half")


@pytest.mark.parametrize("hook", ["blocks.9.hook_mlp_out", "blocks.9.hook_resid_post", "blocks.9.hook_resid_pre"])
def test_reexporting_an_imported_sae_keeps_its_model_and_hook(tmp_path, hook):
    """A SAELens SAE imported into our layout and exported again names the model and hook it came with
    (before: model_name null, and blocks.9.hook_resid_post turned into layer_9, hook_mlp_out into null), and
    SAELens 5's hook_layer is the hook's block (resid_pre's was our layer, 8, one block short of the hook)."""
    src = _saelens(tmp_path / "s", {"architecture": "standard", "metadata": {"model_name": "gpt2", "hook_name": hook}},
                   _tensors(6))
    save_sae(load_sae(src), tmp_path / "ours", training=load_sae(src).training_info)
    for source in (src, tmp_path / "ours"):
        out = export_saelens(source, tmp_path / f"again_{source.name}")
        raw = json.loads((out / "cfg.json").read_text())
        meta = raw["metadata"]
        assert meta["model_name"] == "gpt2" and meta["hook_name"] == hook
        assert (raw["model_name"], raw["hook_name"], raw["hook_layer"]) == ("gpt2", hook, 9)  # SAELens 5's keys
        # read back, "gpt2" is not taken for a model spec of this tool; the layer comes from the hook
        back = load_sae(out)
        assert back.training_info["imported"]["model"] == "gpt2"
        layer = {"blocks.9.hook_mlp_out": None, "blocks.9.hook_resid_post": "9", "blocks.9.hook_resid_pre": "8"}[hook]
        assert trained_on(back) == {"layer": layer, "tokens": None, "model": None}


@pytest.mark.parametrize("case", ["standard", "topk rescaling latents by decoder norms that are not 1",
                                  "batchtopk training checkpoint (topk_threshold, rescaling)",
                                  "topk rescaling, b_dec not applied to the input"])
def test_a_saelens_checkpoint_trained_on_scaled_inputs_folds_its_activation_scaler(tmp_path, case):
    """A SAELens training checkpoint with normalize_activations expected_average_only_in saw x * s, s in
    the activation_scaler.json beside it; SAELens's trainer folds s in (fold_activation_norm_scaling_factor)
    before the decoder norms, so the SAE on x computes the checkpoint's reconstruction of x * s divided by
    s, with codes divided by s where the norms are folded after it."""
    cfg, extra = SAELENS_CASES[case]
    tensors = {**_tensors(7), **extra}
    folder = _saelens(tmp_path / "s", {**cfg, "normalize_activations": "expected_average_only_in"}, tensors)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5, "has_whitening": False}))
    x = torch.randn(64, D_IN) * 2
    z, x_hat = _saelens_reference(cfg, tensors, x * 2.5)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    _assert_same_computation(load_sae(folder), x, z / 2.5 if rescale else z, x_hat / 2.5)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None, "has_whitening": False}))
    with pytest.raises(UserError, match="no activation_scaler.json beside it gives that factor"):
        load_sae(folder)


@pytest.mark.parametrize("case", ["standard", "topk rescaling, b_dec not applied to the input",
                                  "batchtopk training checkpoint (topk_threshold, rescaling)"])
def test_a_saelens_checkpoint_trained_on_whitened_inputs_folds_the_whitening(tmp_path, case):
    """covariance_whitening: the SAE saw w = (x - mean) @ M and its output went back as w_hat @ M^-1 + mean,
    with mean, M and M^-1 in activation_whitening.safetensors beside the checkpoint; folded (after the
    decoder norms, as SAELens's TopK does), the SAE on x gives the same codes and that reconstruction."""
    cfg, extra = SAELENS_CASES[case]
    tensors = {**_tensors(8), **extra}
    folder = _saelens(tmp_path / "s", {**cfg, "normalize_activations": "covariance_whitening"}, tensors)
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, dtype=torch.float64, generator=g))
    lam = torch.rand(D_IN, dtype=torch.float64, generator=g) * 3 + 0.3
    white = {"mean": torch.randn(D_IN, dtype=torch.float64, generator=g), "matrix": (q * lam.rsqrt()).contiguous(),
             "inverse_matrix": (lam.sqrt()[:, None] * q.T).contiguous()}
    save_file(white, str(folder / "activation_whitening.safetensors"))
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None, "has_whitening": True}))
    x = torch.randn(64, D_IN) * 2
    z, w_hat = _saelens_reference(cfg, tensors, (x.double() - white["mean"]) @ white["matrix"])
    _assert_same_computation(load_sae(folder), x, z, w_hat @ white["inverse_matrix"] + white["mean"])


@pytest.mark.parametrize("hook,line", [
    ("blocks.2.hook_resid_post", "  trained  on layer 2, tokens unrecorded"),   # was "on None layer 2, tokens None"
    ("blocks.0.hook_resid_post", "  trained  on layer 0, tokens unrecorded"),   # was "on an unrecorded layer"
    ("blocks.0.hook_mlp_out", "  trained  on an unrecorded layer (give --layer to atlas and steer)"),
])
def test_inspect_of_an_imported_sae_says_what_is_recorded(tmp_path, capsys, hook, line):
    from precompute.__main__ import main

    folder = _saelens(tmp_path / "s", {"architecture": "standard", "metadata": {"hook_name": hook}}, _tensors(6))
    assert main(["inspect", str(folder)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  trained")]
    assert lines == [line]
