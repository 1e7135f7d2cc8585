"""Random models of the real architectures saved like hub downloads, and small image sets, for the
extraction, adapter and store tests. Each is built once per test process (cached) in a temp folder."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

_ROOT = Path(tempfile.mkdtemp(prefix="sae_extract_tests_"))
atexit.register(shutil.rmtree, _ROOT, True)

# A processor with unusual mean/std: a test can tell that preprocessing comes from the saved config.
MEAN, STD = [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]


def _vision_config(layers=3, hidden=32, image=32, patch=8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=2, image_size=image, patch_size=patch, projection_dim=16)


def _clip_processor(size=32):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=MEAN, image_std=STD)


@lru_cache(None)
def clip_vision_dir(layers: int = 3) -> Path:
    """A random transformers CLIPVisionModel + processor saved with save_pretrained."""
    import torch
    from transformers import CLIPVisionModel

    torch.manual_seed(layers)
    d = _ROOT / f"clip_vision_{layers}"
    CLIPVisionModel(_vision_config(layers)).save_pretrained(d)
    _clip_processor().save_pretrained(d)
    return d


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "a", "red", "star", "what", "is", "shown", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<image>"])


@lru_cache(None)
def world_dir() -> Path:
    """The embedded world's model layout: DIR/clip (CLIPModel + CLIPProcessor), DIR/llava (LLaVA)."""
    import torch
    from transformers import (CLIPConfig, CLIPModel, CLIPProcessor, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(0)
    d = _ROOT / "world"
    tok = _tiny_tokenizer()
    vc = _vision_config(layers=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=len(tok), bos_token_id=2, eos_token_id=3, pad_token_id=0)
    CLIPModel(CLIPConfig(vision_config=vc.to_dict(), text_config=text, projection_dim=16)).save_pretrained(d / "clip")
    CLIPProcessor(image_processor=_clip_processor(), tokenizer=tok).save_pretrained(d / "clip")
    image_token = tok.convert_tokens_to_ids("<image>")
    lcfg = LlavaConfig(vision_config=vc.to_dict(),
                       text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok)).to_dict(),
                       image_token_index=image_token, image_seq_length=16, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(lcfg).save_pretrained(d / "llava")
    LlavaProcessor(image_processor=_clip_processor(), tokenizer=tok, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(d / "llava")
    return d


@lru_cache(None)
def dinov2_dir() -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    d = _ROOT / "dinov2"
    # as facebook/dinov2-*: the config's image_size (518 there) is not the processor's crop (224), the model
    # interpolates its position embeddings to the grid it is fed
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=63, patch_size=7)).save_pretrained(d)
    BitImageProcessor(do_resize=True, size={"shortest_edge": 32}, do_center_crop=True,
                      crop_size={"height": 28, "width": 28}, image_mean=MEAN, image_std=STD).save_pretrained(d)
    return d


@lru_cache(None)
def open_clip_file() -> tuple[Path, dict]:
    """A random open_clip ViT-B-32 (pretrained=None) saved to a checkpoint file; returns it and one weight."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = _ROOT / "vit_b_32_random.pt"
    torch.save(model.state_dict(), path)
    return path, {"visual.conv1.weight": model.visual.conv1.weight.detach().clone()}


@lru_cache(None)
def image_dir(n: int = 10, corrupt: tuple[int, ...] = ()) -> Path:
    """`n` random JPEG/PNG images of varied sizes in two class folders; indices in `corrupt` are broken."""
    from PIL import Image

    d = _ROOT / f"images_{n}_{'_'.join(map(str, corrupt))}"
    rng = np.random.default_rng(n)
    for i in range(n):
        cls = d / ("cat" if i < n // 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        p = cls / f"{i:04d}.{'png' if i % 3 == 0 else 'jpg'}"
        h, w = rng.integers(24, 60, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        if i in corrupt:
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 3] if i % 2 else b"garbage" * 10)
    return d


def write_file_list(root: Path, name: str = "list.txt") -> Path:
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".txt")
    lst = root / name
    lst.write_text("\n".join(paths) + "\n")
    return lst


@lru_cache(maxsize=None)
def tiny_open_clip() -> str:
    """The name of a tiny open_clip ViT (2 blocks of width 32, 32 px, patch 16, a text tower), registered with
    open_clip once; `open_clip:NAME` gives it random weights."""
    import json

    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
    (_ROOT / "tiny-vit-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(_ROOT / "tiny-vit-test.json")
    return "tiny-vit-test"
