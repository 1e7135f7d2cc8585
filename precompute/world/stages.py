"""The four stages of `precompute world`; each writes to a temporary name and renames when done."""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from sae_core.atomic import readable_as_new
from sae_core.progress import transformers_bars_as_lines
from sae_core.world.generator import WorldSpec
from sae_core.world.taxonomy import build_taxonomy
from sae_core.world.text import CHAT_TEMPLATE, build_tokenizer, vocabulary
from . import STAGE_FILE, _fresh_tmp, _write_json
from .pool import IMAGE_MEAN, IMAGE_STD, Pool

STAGES = ("world", "clip", "llava", "report")
"""The stages of `precompute world`, in order; each is done when `stage_done` says so."""
GATE_KEYS = ("clip_colour_acc", "clip_shape_acc", "llava_colour_acc", "llava_shape_acc", "caption_acc")
LATER = {"world": ("clip", "llava", "report.json"), "clip": ("llava", "report.json"), "llava": ("report.json",)}


def configure_torch(threads: int = 1) -> None:
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)


def stage_done(out: Path, name: str) -> bool:
    if name == "world":
        return (out / "world.json").is_file() and (out / "taxonomy.json").is_file()
    if name == "report":
        return (out / "report.json").is_file()
    return (out / name / STAGE_FILE).is_file()


def _invalidate_later(out: Path, name: str) -> None:
    for later in LATER[name]:
        p = out / later
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _finish_dir(tmp: Path, final: Path, info: dict) -> None:
    _write_json(tmp / STAGE_FILE, info)
    readable_as_new(tmp)  # save_pretrained's model.safetensors is 0600
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _spec(out: Path) -> WorldSpec:
    with open(out / "world.json", encoding="utf-8") as f:
        return WorldSpec.from_json(json.load(f))


_train_pools: dict = {}
"""The train pool rendered in this process, by world directory and spec: the CLIP and LLaVA stages of one
build share it (20,000 images for the demo world, about 16 s to render); `run` empties it at the end."""


def train_pool(out: Path, spec: WorldSpec) -> Pool:
    key = (str(Path(out).resolve()), repr(spec))
    if key not in _train_pools:
        _train_pools.clear()
        _train_pools[key] = Pool(spec, "train", spec.splits["train"], desc="render train images")
    return _train_pools[key]


def forget_train_pool() -> None:
    _train_pools.clear()


def stage_world(out: Path, preset: dict, seed: int) -> None:
    _invalidate_later(out, "world")
    name = next(k for k, v in _presets().items() if v is preset)
    spec = WorldSpec(seed=seed, **preset["world"])
    meta = {"schema": 1, "preset": name, **spec.to_json(), "taxonomy": "taxonomy.json",
            "train_shapes": list(spec.train_shapes), "train_colours": list(spec.train_colours),
            "image": "re-rendered by sae_core.world.generator.render(spec, split, index); never stored"}
    _write_json(out / "taxonomy.json", build_taxonomy(spec))
    _write_json(out / "world.json", meta)  # last: world.json marks the stage done


def _presets():
    from .presets import PRESETS
    return PRESETS


def image_processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
                              crop_size={"height": size, "width": size}, image_mean=list(IMAGE_MEAN),
                              image_std=list(IMAGE_STD), do_convert_rgb=True, resample=3)


def stage_clip(out: Path, preset: dict, seed: int) -> None:
    from transformers import CLIPProcessor

    from .clip import build_clip, train_clip

    _invalidate_later(out, "clip")
    spec, cfg = _spec(out), preset["clip"]
    t0 = time.time()
    pool = train_pool(out, spec)
    render_s = time.time() - t0
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(add_eos=True, model_max_length=cfg["max_text_len"])
    model = build_clip(cfg, spec.image_size, len(vocabulary()))
    info = train_clip(model, tokenizer, pool, cfg, seed)
    tmp = _fresh_tmp(out / "clip")
    model.save_pretrained(tmp)
    CLIPProcessor(image_processor=image_processor(spec.image_size), tokenizer=tokenizer).save_pretrained(tmp)
    _finish_dir(tmp, out / "clip", {"seconds": round(time.time() - t0, 1), "render_s": round(render_s, 1),
                                    "config": cfg, **info})


def stage_llava(out: Path, preset: dict, seed: int) -> None:
    from transformers import CLIPModel, LlavaProcessor

    from .llava import build_llava, train_llava

    _invalidate_later(out, "llava")
    spec, cfg = _spec(out), preset["llava"]
    t0 = time.time()
    with transformers_bars_as_lines():
        clip = CLIPModel.from_pretrained(out / "clip")
    pool = train_pool(out, spec)
    torch.manual_seed(seed + 1)
    model = build_llava(clip, cfg, len(vocabulary()))
    tokenizer = build_tokenizer(add_eos=False, model_max_length=128)
    info = train_llava(model, tokenizer, pool, cfg, seed + 1)
    vision = clip.config.vision_config
    processor = LlavaProcessor(image_processor=image_processor(spec.image_size), tokenizer=tokenizer,
                               patch_size=vision.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    tmp = _fresh_tmp(out / "llava")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    _finish_dir(tmp, out / "llava", {"seconds": round(time.time() - t0, 1), "config": cfg, **info})


def stage_report(out: Path, preset: dict, seed: int) -> None:
    import transformers
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    from .clip import zero_shot
    from .llava import evaluate_llava

    t0 = time.time()
    spec = _spec(out)
    with open(out / "world.json", encoding="utf-8") as f:
        meta = json.load(f)
    n_val = min(preset["eval_val"], spec.splits["val"])
    val = Pool(spec, "val", n_val, desc="render val images")
    with transformers_bars_as_lines():
        clip = CLIPModel.from_pretrained(out / "clip").eval()
        llava = LlavaForConditionalGeneration.from_pretrained(out / "llava").eval()
    clip_proc = AutoProcessor.from_pretrained(out / "clip")
    zs = zero_shot(clip, clip_proc.tokenizer, val, spec.train_colours, spec.train_shapes)
    llava_proc = AutoProcessor.from_pretrained(out / "llava")
    lv = evaluate_llava(llava, llava_proc, val, spec.train_colours, spec.train_shapes)
    eval_s = time.time() - t0
    stage_s = {}
    for name in ("clip", "llava"):
        with open(out / name / STAGE_FILE, encoding="utf-8") as f:
            stage_s[name] = json.load(f)["seconds"]
    figures = {"clip_colour_acc": zs["colour_acc"], "clip_shape_acc": zs["shape_acc"],
               "llava_colour_acc": lv["colour_acc"], "llava_shape_acc": lv["shape_acc"],
               "caption_acc": lv["caption_acc"]}
    figures = {k: round(v, 4) for k, v in figures.items()}
    gates = preset["gates"]
    report = {
        **figures,
        "gates": gates,
        "gates_passed": all(figures[k] >= gates[k] for k in GATE_KEYS),
        "preset": meta["preset"], "seed": meta["seed"],
        "eval": {"split": "val", "images": n_val, "single_object_images": zs["n_images"],
                 "clip_prompts": ["a photo of a {colour} object", "a photo of a {shape}"],
                 "llava_questions": {"shape": "What is shown in this image? Use exactly one word!",
                                     "colour": "What colour is the shape? Use one word.",
                                     "caption": "Describe the image."},
                 "caption_examples": lv["examples"]},
        "build_time_s": round(stage_s["clip"] + stage_s["llava"] + eval_s, 1),
        "timings": {"clip_s": stage_s["clip"], "llava_s": stage_s["llava"], "report_s": round(eval_s, 1),
                    "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    _write_json(out / "report.json", report)
