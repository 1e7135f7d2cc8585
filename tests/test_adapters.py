"""Adapters against the models' own outputs: extracted activations must equal output_hidden_states=True
(or open_clip's forward_intermediates), embeddings the models' own image features, preprocessing the
saved processor config, and LLaVA's adapter must name exactly the tensor LLaVA feeds its projector."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sae_core.adapters import TokenLayout, TokenSpec, load_adapter, select_tokens
from sae_core.errors import UserError
from tests import extract_helpers as H


def _pixels(adapter, n=3, seed=0):
    rng = np.random.default_rng(seed)
    ims = [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]
    return adapter.preprocess(ims)


def _all_hidden_layers(n_blocks):
    return [str(i) for i in range(n_blocks)] + [str(-i) for i in range(1, n_blocks + 2)]


def _check_against_hidden_states(adapter, pixels, hidden_states):
    """Every block layer and every negative index against the reference hidden_states tuple."""
    n = adapter.n_blocks
    assert len(hidden_states) == n + 1
    got = adapter.capture(pixels, _all_hidden_layers(n))
    for i in range(n):
        torch.testing.assert_close(got[str(i)], hidden_states[i + 1], rtol=0, atol=0)
    for i in range(1, n + 2):
        torch.testing.assert_close(got[str(-i)], hidden_states[-i], rtol=0, atol=0)


def test_hf_clip_vision_matches_hidden_states_and_processor():
    from transformers import CLIPVisionModel

    src = H.clip_vision_dir()
    a = load_adapter(f"hf:{src}")
    assert (a.n_blocks, a.width, a.layout) == (3, 32, TokenLayout(1, (4, 4), True))
    assert a.read_layer is None
    ref = CLIPVisionModel.from_pretrained(src).eval()
    px = _pixels(a)
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True)
    _check_against_hidden_states(a, px, out.hidden_states)
    torch.testing.assert_close(a.embed(px), out.pooler_output, rtol=0, atol=0)
    # Preprocessing comes from the saved processor: a uniform image becomes (c/255 - mean) / std.
    grey = a.transform(Image.new("RGB", (50, 70), (51, 102, 204)))
    want = (np.array([51, 102, 204]) / 255 - np.array(H.MEAN)) / np.array(H.STD)
    assert grey.shape == (3, 32, 32)
    np.testing.assert_allclose(grey.mean(dim=(1, 2)).numpy(), want, atol=2e-3)


def test_hf_clip_model_and_dinov2():
    from transformers import CLIPModel, Dinov2Model

    src = H.world_dir() / "clip"
    a = load_adapter(f"hf:{src}")
    ref = CLIPModel.from_pretrained(src).eval()
    px = _pixels(a)
    with torch.no_grad():
        hs = ref.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
        feats = ref.get_image_features(pixel_values=px).pooler_output
    _check_against_hidden_states(a, px, hs)
    assert a.embed_dim == 16
    torch.testing.assert_close(a.embed(px), feats, rtol=0, atol=0)

    src = H.dinov2_dir()
    a = load_adapter(f"hf:{src}")
    assert a.layout == TokenLayout(1, (4, 4), True) and a.image_size == (28, 28)
    ref = Dinov2Model.from_pretrained(src).eval()
    px = _pixels(a)
    assert px.shape == (3, 3, 28, 28)
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True)
    _check_against_hidden_states(a, px, out.hidden_states)
    torch.testing.assert_close(a.embed(px), out.pooler_output, rtol=0, atol=0)


def test_open_clip_checkpoint_file_matches_forward_intermediates():
    import open_clip

    path, weights = H.open_clip_file()
    a = load_adapter(f"open_clip:ViT-B-32/{path}")
    # the checkpoint file was really loaded (a fresh random model would differ)
    torch.testing.assert_close(a.model.visual.conv1.weight, weights["visual.conv1.weight"], rtol=0, atol=0)
    assert (a.n_blocks, a.width, a.embed_dim, a.layout) == (12, 768, 512, TokenLayout(1, (7, 7), True))
    px = _pixels(a, n=2)
    assert px.shape == (2, 3, 224, 224)
    # open_clip's default (OpenAI) normalisation, typed here independently of open_clip
    grey = a.transform(Image.new("RGB", (300, 260), (128, 128, 128)))
    want = (128 / 255 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(grey.mean(dim=(1, 2)).numpy(), want, atol=2e-3)
    with torch.no_grad():
        ref = a.model.visual.forward_intermediates(px, indices=[0, 5, 10, 11], output_fmt="NLC",
                                                   output_extra_tokens=True, intermediates_only=True)
        emb = a.model.encode_image(px)
    got = a.capture(px, ["0", "5", "-2", "-1", "embed"])
    for name, i in (("0", 0), ("5", 1), ("-2", 2), ("-1", 3)):
        full = torch.cat([ref["image_intermediates_prefix"][i], ref["image_intermediates"][i]], dim=1)
        torch.testing.assert_close(got[name], full, rtol=0, atol=0)
    torch.testing.assert_close(got["embed"], emb, rtol=0, atol=0)


def _projector_input(full, px):
    """What a full LLaVA hands its projector for pixels `px`: the vision features it reads."""
    seen = {}
    hook = full.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            full.model.get_image_features(pixel_values=px)
    finally:
        hook.remove()
    return seen["x"]


def test_llava_tower_is_what_llava_reads():
    from transformers import LlavaForConditionalGeneration

    src = H.world_dir() / "llava"
    a = load_adapter(f"llava:{src}")  # tower weights only
    assert a.llava is None and a.read_layer == -2 and a.read_tokens == "patches"
    assert a.read_layer_block() == a.n_blocks - 2
    full = LlavaForConditionalGeneration.from_pretrained(src).eval()
    px = _pixels(a)
    with torch.no_grad():
        hs = full.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states
    projected = _projector_input(full, px)
    _check_against_hidden_states(a, px, hs)
    # exactly the tensor LLaVA projects: the read layer, CLS dropped
    h = a.capture(px, [a.read_layer])[str(a.read_layer)]
    rows, index = select_tokens(h, TokenSpec.parse(a.read_tokens), np.arange(3), a.layout)
    torch.testing.assert_close(rows.reshape(projected.shape), projected, rtol=0, atol=0)
    assert index[:16, 1].tolist() == list(range(1, 17))
    # the world spec maps onto the same model; full=True gives the whole LLaVA for steering
    w = load_adapter(f"world:{src.parent}:llava", full_llava=True)
    assert w.backend == "world" and w.llava is not None and w.layer_module(-2) is w.llava.model.vision_tower.encoder.layers[2]
    eager = load_adapter(f"llava:{src}", full_llava={"attn_implementation": "eager"})
    assert eager.llava.config._attn_implementation == "eager"  # from_pretrained kwargs reach the model
    torch.testing.assert_close(w.capture(px, ["-2"])["-2"], hs[-2], rtol=0, atol=0)
    c = load_adapter(f"world:{src.parent}")
    assert c.backend == "world" and c.embed_dim == 16 and c.read_layer is None


def test_a_llava_reading_a_layer_counted_from_the_input_is_read_there(tmp_path):
    """vision_feature_layer indexes hidden_states: a LLaVA saved with 2 (or 3) reads the output of block 1 (2),
    which our layer 2 is not (a block number). Until 2026-12-05 such a LLaVA was extracted and steered one block
    deeper than it reads. Reference: the tensor the LLaVA itself hands its projector."""
    import shutil

    from transformers import LlavaForConditionalGeneration

    for counted, ours in ((2, -3), (3, -2)):
        src = tmp_path / f"llava_{counted}"
        shutil.copytree(H.world_dir() / "llava", src)
        config = json.loads((src / "config.json").read_text())
        config["vision_feature_layer"] = counted
        (src / "config.json").write_text(json.dumps(config))
        a = load_adapter(f"llava:{src}")
        assert a.read_layer == ours and a.read_layer_block() == counted - 1
        full = LlavaForConditionalGeneration.from_pretrained(src).eval()
        px = _pixels(a)
        projected = _projector_input(full, px)
        rows, _ = select_tokens(a.capture(px, [a.read_layer])[str(a.read_layer)], TokenSpec.parse(a.read_tokens),
                                np.arange(3), a.layout)
        torch.testing.assert_close(rows.reshape(projected.shape), projected, rtol=0, atol=0)


def test_a_llava_placed_by_from_pretrained_stays_where_and_as_it_was_loaded():
    """A LLaVA that from_pretrained placed on one device (what steering passes on CUDA: device_map {"": "cuda"}
    and the dtype) is not moved again: transformers records no hf_device_map for a one-device map, so the adapter
    took it for unplaced and moved it to the CPU in fp32 and back (28 GB of host memory for llava-1.5-7b). Here
    the CPU and bf16 stand in for CUDA and its dtype: loaded in bf16, it stayed bf16 through load_adapter's
    move to (cpu, fp32), and the adapter feeds pixels in bf16."""
    src = H.world_dir()
    a = load_adapter(f"world:{src}:llava", full_llava={"device_map": {"": "cpu"}, "dtype": torch.bfloat16})
    assert {p.dtype for p in a.llava.parameters()} == {torch.bfloat16}
    assert a.dtype == torch.bfloat16 and a.device == torch.device("cpu")
    ref = load_adapter(f"world:{src}:llava", full_llava=True)  # unplaced: moved by .to() as before
    assert {p.dtype for p in ref.llava.parameters()} == {torch.float32} and ref.dtype == torch.float32
    px = _pixels(ref)
    h, h_ref = a.capture(px, ["-2"])["-2"], ref.capture(px, ["-2"])["-2"]
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), h_ref, rtol=0.05, atol=0.05)


def test_llava_tower_from_a_sharded_checkpoint(tmp_path, monkeypatch):
    """Hub LLaVA checkpoints are sharded: only the shards holding vision_tower weights are read."""
    import json
    import os
    import shutil

    import safetensors
    from transformers import LlavaForConditionalGeneration

    src = H.world_dir() / "llava"
    LlavaForConditionalGeneration.from_pretrained(src).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    for f in src.glob("*.json"):
        if not (tmp_path / "sharded" / f.name).exists():
            shutil.copy(f, tmp_path / "sharded")
    weight_map = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    vision = {f for k, f in weight_map.items() if "vision_tower." in k}
    assert set(weight_map.values()) - vision  # shards of the language model alone, which need not be read
    opened, safe_open = [], safetensors.safe_open

    def recording(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return safe_open(path, *args, **kwargs)

    a = load_adapter(f"llava:{src}")
    monkeypatch.setattr(safetensors, "safe_open", recording)
    b = load_adapter(f"llava:{tmp_path / 'sharded'}")
    assert set(opened) == vision
    px = _pixels(a, n=2)
    torch.testing.assert_close(a.capture(px, ["-2", "embed"])["-2"], b.capture(px, ["-2", "embed"])["-2"], rtol=0, atol=0)


def test_layer_numbering_on_a_24_block_tower():
    src = H.clip_vision_dir(layers=24)
    a = load_adapter(f"hf:{src}")
    assert a.resolve_layer(22) == a.resolve_layer(-2).__class__("22", "block", 22)
    assert a.resolve_layer(-2).block == 22 and a.resolve_layer(-1).block == 23 and a.resolve_layer(0).block == 0
    assert a.resolve_layer(-25).kind == "input"
    px = _pixels(a, n=2)
    got = a.capture(px, ["22", "-2"])
    torch.testing.assert_close(got["22"], got["-2"], rtol=0, atol=0)
    for bad in (24, -26):
        with pytest.raises(UserError, match="24 blocks"):
            a.resolve_layer(bad)


def test_early_stop_skips_later_blocks_and_hooks_are_removed_after_errors():
    a = load_adapter(f"hf:{H.clip_vision_dir()}")
    px = _pixels(a, n=2)
    ran = []
    counters = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(a.blocks)]
    full = a.capture(px, ["0", "2"], stop_early=False)
    ran.clear()
    early = a.capture(px, ["0"])
    assert ran == [0]  # blocks 1 and 2 never ran
    torch.testing.assert_close(early["0"], full["0"], rtol=0, atol=0)
    for h in counters:
        h.remove()

    def boom(m, i, o):
        raise RuntimeError("boom")

    bomb = a.blocks[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        a.capture(px, ["0", "2", "-4"])
    bomb.remove()
    with pytest.raises(Exception):
        a.capture(torch.zeros(2, 3, 31, 31), ["1"])  # wrong image size fails inside the model
    for b in a.blocks:
        assert not b._forward_hooks and not b._forward_pre_hooks
    # and the model still gives its plain result afterwards
    torch.testing.assert_close(a.capture(px, ["2"])["2"], full["2"], rtol=0, atol=0)


def test_capture_hooks_act_only_in_their_own_thread():
    """A request's recording hooks sit on the shared model; another thread's pass meanwhile (the
    explorer runs several requests at once) is neither recorded into this sink nor stopped by it."""
    import threading

    from sae_core.adapters import _StopForward

    a = load_adapter(f"hf:{H.clip_vision_dir()}")
    mine, other = _pixels(a, n=2, seed=0), _pixels(a, n=2, seed=1)
    ref_mine, ref_other = a.capture(mine, ["0"])["0"], a.embed(other)
    sink, seen = {}, {}
    with a.hooks([a.resolve_layer("0")], sink):
        t = threading.Thread(target=lambda: seen.update(embed=a.embed(other), block=a.capture(other, ["0"])["0"]))
        t.start()
        t.join()
        assert sink == {}  # the other thread's passes left nothing here
        with pytest.raises(_StopForward):  # this thread's own pass is stopped after block 0
            a.embed(mine)
    torch.testing.assert_close(seen["embed"], ref_other, rtol=0, atol=0)   # ran to the end, not stopped
    torch.testing.assert_close(seen["block"], a.capture(other, ["0"])["0"], rtol=0, atol=0)
    torch.testing.assert_close(sink["0"], ref_mine, rtol=0, atol=0)


def test_token_selection_against_direct_indexing():
    layout = TokenLayout(1, (2, 3), True)
    h = torch.randn(2, 7, 4)
    ids = np.array([10, 11])
    rows, idx = select_tokens(h, TokenSpec.parse("cls"), ids, layout)
    torch.testing.assert_close(rows, h[:, 0])
    assert idx.tolist() == [[10, 0], [11, 0]]
    rows, idx = select_tokens(h, TokenSpec.parse("mean"), ids, layout)
    torch.testing.assert_close(rows, h[:, 1:].mean(1))
    assert idx[:, 1].tolist() == [-1, -1]
    rows, idx = select_tokens(h, TokenSpec.parse("all"), ids, layout)
    torch.testing.assert_close(rows, h.reshape(14, 4))
    rows, idx = select_tokens(h, TokenSpec.parse("random:3"), ids, layout, seed=5)
    for r, (img, pos) in zip(rows, idx):
        torch.testing.assert_close(r, h[img - 10, pos])
    assert len(set(idx[:3, 1])) == 3 and (idx[:3, 1] != idx[3:, 1]).any()
    _, again = select_tokens(h[1:], TokenSpec.parse("random:3"), ids[1:], layout, seed=5)
    assert again.tolist() == idx[3:].tolist()  # a function of (seed, image), not of the batch
    assert layout.patch_rc(0) is None and layout.patch_rc(6) == (1, 2)
    for bad in ("random:0", "cls2", "random:x"):
        with pytest.raises(UserError):
            TokenSpec.parse(bad)
    with pytest.raises(UserError, match="no CLS"):
        TokenSpec.parse("cls").check(TokenLayout(0, (2, 2), False), "siglip")


@pytest.mark.parametrize("spec, msg", [
    ("clip:foo", "does not start with"),
    ("hf:/nonexistent/model_dir", r"cannot load the config of /nonexistent/model_dir: /nonexistent/model_dir does "
                                  r"not exist \(a path, not a hub id\)"),  # not transformers' "Repo id must use ..."
    ("llava:./nonexistent_llava", r"\./nonexistent_llava does not exist \(a path, not a hub id\)"),
    ("hf:~/nonexistent_model_dir", "does not exist"),
    ("open_clip:NoSuchModel-X", r"^open_clip has no model 'NoSuchModel-X'"),
    ("open_clip:ViT-B-32//nonexistent/ckpt.pt", "does not exist"),
    ("world:/nonexistent/world", "python -m precompute world"),
])
def test_bad_model_specs_are_one_sentence_errors(spec, msg):
    with pytest.raises(UserError, match=msg):
        load_adapter(spec)


def test_an_open_clip_tag_without_its_weights_offline_is_one_sentence_saying_so(capfd, monkeypatch, tmp_path):
    """A known tag whose weights this machine has not cached, offline: open_clip logged "ERROR:root:Failed to
    download weights ..." before our sentence, which told the user to check the name (which was right). The hub's
    cache is an empty folder here, so the weights are missing whatever this machine has cached."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # read at each download, not only at import
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's own URL downloads go to ~/.cache/clip
    with pytest.raises(UserError) as e:
        load_adapter("open_clip:ViT-B-32/openai")
    said = str(e.value)
    assert said == ("cannot load open_clip model 'ViT-B-32' with pretrained='openai': its weights are not in this "
                    "machine's cache and could not be downloaded (no network, or HF_HUB_OFFLINE=1); fetch them once "
                    "where the hub is reachable, or pass a local checkpoint file.")
    assert "ERROR" not in capfd.readouterr().err


def test_an_unknown_open_clip_name_or_tag_is_a_short_sentence_with_what_there_is():
    """open_clip's own error for an unknown name listed all of its ~150 model names in one 3,000-character
    line; for an unknown tag it logged an ERROR line beside a sentence naming none. Now: the nearest names, or
    the model's tags (ten, and how many more), before open_clip tries to build or download anything."""
    import open_clip

    from sae_core.adapters import _refuse_unknown_open_clip

    with pytest.raises(UserError) as e:
        load_adapter("open_clip:ViT-L-14-337/openai")
    said = str(e.value)
    assert said.startswith("open_clip has no model 'ViT-L-14-337'; the nearest names are ViT-L-14-336") and \
        f"lists all {len(open_clip.list_models())})." in said and len(said) < 300
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-32")
    assert len(tags) > 10
    with pytest.raises(UserError) as e:
        load_adapter("open_clip:ViT-B-32/no_such_tag")
    assert str(e.value) == (f"open_clip has no pretrained weights 'no_such_tag' for ViT-B-32; its tags are "
                            f"{', '.join(tags[:10])} and {len(tags) - 10} more, or pass a local checkpoint file.")
    for tag in ("openai", "OpenAI", "laion2b-s34b-b79k"):  # open_clip's own spellings of its tags pass
        assert _refuse_unknown_open_clip(open_clip, "ViT-B-32", tag) is None
    assert _refuse_unknown_open_clip(open_clip, "hf-hub:org/any", None) is None  # read from the hub, not listed


def test_open_clip_timm_siglip_tower_without_cls(tmp_path):
    """open_clip models with a timm trunk (SigLIP): no CLS token, blocks at visual.trunk.blocks."""
    import json

    import open_clip

    cfg = {"embed_dim": 48, "init_logit_bias": -10,
           "vision_cfg": {"image_size": 256, "timm_model_name": "vit_base_patch32_siglip_256",
                          "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "linear"},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1,
                        "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}}
    (tmp_path / "tiny-siglip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-siglip-test.json")
    a = load_adapter("open_clip:tiny-siglip-test")
    assert a.layout == TokenLayout(0, (8, 8), False) and (a.n_blocks, a.width, a.embed_dim) == (12, 768, 48)
    px = _pixels(a, n=2)
    with torch.no_grad():
        ref = a.model.visual.trunk.forward_intermediates(px, indices=[0, 11], output_fmt="NLC", intermediates_only=True)
        emb = a.model.encode_image(px)
    got = a.capture(px, ["0", "-1", "embed"])
    torch.testing.assert_close(got["0"], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got["-1"], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(got["embed"], emb, rtol=0, atol=0)
    with pytest.raises(UserError, match="no CLS token"):
        TokenSpec.parse("cls").check(a.layout, a.spec)


def test_hf_siglip_without_cls_and_dinov2_with_registers(tmp_path):
    from transformers import (BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
                              SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel)

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=32, patch_size=8)).save_pretrained(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7,
        num_register_tokens=4)).save_pretrained(tmp_path / "reg")
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path / "reg")
    for name, cls, layout in (("siglip", SiglipVisionModel, TokenLayout(0, (4, 4), False)),
                              ("reg", Dinov2WithRegistersModel, TokenLayout(5, (4, 4), True))):
        a = load_adapter(f"hf:{tmp_path / name}")
        assert a.layout == layout
        px = _pixels(a, n=2)
        # Frozen like the adapter's model: with parameters that require grad, torch 2.14 takes
        # nn.MultiheadAttention's slow path in SigLIP's pooling head (4e-7 away) even under no_grad.
        ref = cls.from_pretrained(tmp_path / name).eval().requires_grad_(False)
        with torch.no_grad():
            out = ref(pixel_values=px, output_hidden_states=True)
        _check_against_hidden_states(a, px, out.hidden_states)
        torch.testing.assert_close(a.embed(px), out.pooler_output, rtol=0, atol=0)


def test_every_model_loader_waits_while_another_thread_loads(tmp_path):
    """The explorer loads models from request threads and from its background warm-up; a load that imported
    transformers while another thread's import of it was under way failed ("cannot import name
    'AutoProcessor'"). Each loader in sae_core therefore waits while another holds MODEL_LOADING: here the
    test holds it, each loader (given a missing model, so it fails fast once it runs) must still be waiting
    after 0.5 s, and must finish once the lock is let go."""
    import threading
    from types import SimpleNamespace

    from sae_core.adapters import MODEL_LOADING
    from sae_core.crossmodal import LanguageResidual
    from sae_core.steering import SteeringSession
    from sae_core.text_encoders import load_text_embedder, text_embedder_for

    missing = str(tmp_path / "missing")
    loaders = {
        "load_adapter": lambda: load_adapter(f"world:{missing}"),
        "load_text_embedder": lambda: load_text_embedder(f"world:{missing}"),
        "text_embedder_for": lambda: text_embedder_for(SimpleNamespace(backend="hf", model_type="dinov2",
                                                                       spec="hf:x", name="x")),
        "SteeringSession": lambda: SteeringSession(None, f"world:{missing}:llava", -2, device="cpu"),
        "LanguageResidual": lambda: LanguageResidual(missing),
    }
    for name, load in loaders.items():
        ended = threading.Event()

        def run():
            try:
                load()
            except Exception:  # noqa: BLE001 - a missing model: it ran, which is all this test asks
                pass
            ended.set()

        with MODEL_LOADING:
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            assert not ended.wait(0.5), f"{name} ran while another thread held MODEL_LOADING"
        assert ended.wait(60), f"{name} did not run once MODEL_LOADING was let go"
        thread.join(5)


def _without_centre_crop(src, dst):
    """A copy of the saved model `src` whose image processor keeps the image's shape (do_center_crop false)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (dst / name).exists():
            cfg = json.loads((dst / name).read_text())
            (cfg.get("image_processor") or cfg)["do_center_crop"] = False
            (dst / name).write_text(json.dumps(cfg))
    return dst


def test_a_processor_that_keeps_the_image_shape_is_refused_when_the_model_loads(tmp_path):
    """The layout was worked out from one square image; a processor without its centre crop makes a wide image
    wider, and extraction ended in torch.stack's traceback (or a token count the layout did not have). Every
    loader (hf:, llava: and so steering, world:) refuses it in one sentence; a processor with one size still loads
    with the size its processor really gives any image."""
    from transformers import AutoImageProcessor

    wide = Image.new("RGB", (200, 60))
    for name, src in (("dino", H.dinov2_dir()), ("clip", H.clip_vision_dir()), ("llava", H.world_dir() / "llava")):
        kept = _without_centre_crop(src, tmp_path / name)
        proc = AutoImageProcessor.from_pretrained(kept)
        assert proc(images=wide, return_tensors="pt")["pixel_values"].shape[-2:] != \
            proc(images=Image.new("RGB", (60, 60)), return_tensors="pt")["pixel_values"].shape[-2:]
        for spec in (f"hf:{kept}",) + ((f"llava:{kept}",) if name == "llava" else ()):
            with pytest.raises(UserError, match=r"^the image processor of .* gives pictures of different sizes for "
                               r"images of different shapes \(\d+x\d+ for a square one, \d+x\d+ for another\).*; give "
                               r"it a fixed size \(do_center_crop"):
                load_adapter(spec)
        a = load_adapter(f"hf:{src}")
        assert a.image_size == tuple(AutoImageProcessor.from_pretrained(src)(
            images=wide, return_tensors="pt")["pixel_values"].shape[-2:])


def test_hf_clip_vision_model_with_projection_embeds_with_its_projection(tmp_path):
    """AutoModel built a CLIPVisionModel of this checkpoint and dropped visual_projection (transformers only
    reported it UNEXPECTED), so `embed` (the MS and search embedding) was the 32-d pooled output, not the
    16-d image_embeds the checkpoint's own class gives."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(H._vision_config()).save_pretrained(tmp_path / "proj")
    H._clip_processor().save_pretrained(tmp_path / "proj")
    a = load_adapter(f"hf:{tmp_path / 'proj'}")
    ref = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "proj").eval().requires_grad_(False)
    px = _pixels(a)
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True)
    assert (a.width, a.embed_dim, out.image_embeds.shape[-1]) == (32, 16, 16)
    _check_against_hidden_states(a, px, out.hidden_states)
    torch.testing.assert_close(a.capture(px, ["embed"])["embed"], out.image_embeds, rtol=0, atol=0)


def test_a_home_relative_spec_loads_from_python_as_from_the_commands(tmp_path, monkeypatch):
    """`load_adapter("hf:~/proj")` from Python (the commands pass their specs through absolute_spec first) took
    "~/proj" for a hub id until 2026-12-05: "Repo id must use alphanumeric chars"."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(H._vision_config()).save_pretrained(tmp_path / "proj")
    H._clip_processor().save_pretrained(tmp_path / "proj")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MODELS", str(tmp_path))
    for spec in ("hf:~/proj", "hf:$MODELS/proj"):
        a = load_adapter(spec)
        assert a.spec == f"hf:{tmp_path / 'proj'}"  # recorded as the manifests record it
        torch.testing.assert_close(a.capture(_pixels(a), ["embed"])["embed"],
                                   load_adapter(f"hf:{tmp_path / 'proj'}").capture(_pixels(a), ["embed"])["embed"])


def test_a_checkpoint_that_lacks_weights_of_the_model_built_of_it_is_refused(tmp_path):
    """A CLIP or SigLIP image classifier's config is a two-tower model's: AutoModel built a CLIPModel/SiglipModel
    of it with a random text tower (and, for CLIP, a random visual_projection, so `embed` was noise), which
    transformers only reported."""
    from transformers import (AutoModel, CLIPConfig, CLIPForImageClassification, SiglipConfig,
                              SiglipForImageClassification, SiglipImageProcessor)

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPForImageClassification(CLIPConfig(vision_config=tower, text_config=text, num_labels=3)).save_pretrained(
        tmp_path / "clip")
    H._clip_processor().save_pretrained(tmp_path / "clip")
    SiglipForImageClassification(SiglipConfig(vision_config=tower, text_config=text, num_labels=3)).save_pretrained(
        tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    for name, cls in (("clip", "CLIPForImageClassification"), ("siglip", "SiglipForImageClassification")):
        _, info = AutoModel.from_pretrained(tmp_path / name, output_loading_info=True)
        assert info["missing_keys"]  # what transformers itself says of the model AutoModel builds
        with pytest.raises(UserError, match=rf"^{tmp_path / name} \({cls}\) lacks {len(info['missing_keys'])} weights "
                           r"of the \w+Model hf: builds of it \(e\.g\. .*\), which would be random; pass a CLIP"):
            load_adapter(f"hf:{tmp_path / name}")


def test_an_open_clip_model_without_weights_is_the_same_model_at_every_load():
    """`open_clip:NAME` with no PRETRAINED is random weights; each load drew new ones until 2026-12-05, so the atlas
    read another model than the SAE was trained on (FVU 1.13 for an SAE holding out 0.20, a reviewer's run) and a
    resumed or multi-process extraction mixed models. Every load gives the same weights (seed 0), and the caller's
    random state is left as it was."""
    spec = f"open_clip:{H.tiny_open_clip()}"
    torch.manual_seed(1)
    a = load_adapter(spec)
    after = torch.rand(3)
    torch.manual_seed(1)
    torch.rand(3)  # another state than the first load saw
    b = load_adapter(spec)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after)  # the load drew nothing from the caller's generator


def test_a_model_of_another_type_is_named_with_what_reads_it(tmp_path):
    """llava: on a folder of another model type offered hf: for it whatever the type ("is a 'opt' model, not LLaVA;
    use hf:... for it", which hf: then refused), until 2026-12-06: it offers hf: only for a type hf: reads."""
    from transformers import CLIPVisionConfig, OPTConfig

    from sae_core.adapters import HFVisionAdapter, LlavaAdapter
    from sae_core.errors import UserError

    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, vocab_size=50,
              max_position_embeddings=32, word_embed_proj_dim=16).save_pretrained(tmp_path / "opt")
    CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                     patch_size=16).save_pretrained(tmp_path / "clipv")
    towers = ", ".join(HFVisionAdapter.SUPPORTED)
    opt, clipv = str(tmp_path / "opt"), str(tmp_path / "clipv")
    with pytest.raises(UserError) as e:
        LlavaAdapter(f"llava:{opt}", opt)
    assert str(e.value) == (f"{opt} is a model of type 'opt', not LLaVA; llava: reads LLaVA checkpoints and hf: the "
                            f"vision towers {towers}.")
    with pytest.raises(UserError) as e:
        LlavaAdapter(f"llava:{clipv}", clipv)
    assert str(e.value) == f"{clipv} is a model of type 'clip_vision_model', not LLaVA; use hf:{clipv} for it."
    with pytest.raises(UserError) as e:
        HFVisionAdapter(f"hf:{opt}", opt)
    assert str(e.value) == f"{opt} is a model of type 'opt'; hf: supports {towers} (and llava via llava:)."
