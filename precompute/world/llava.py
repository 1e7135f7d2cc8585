"""The tiny LLaVA: the tiny CLIP's vision tower (frozen), a projector and a tiny Llama.

Training runs the vision tower once per pool image (it is frozen) and then teaches projector and
language model to answer, exactly as `LlavaForConditionalGeneration.forward` would combine them:
image-token embeddings replaced by projected features of `hidden_states[vision_feature_layer]`
without CLS. Evaluation goes through the saved processor and `generate`, the path users take.
"""
from __future__ import annotations

import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from sae_core.progress import progress_bar
from sae_core.world.text import (BOS, EOS, IMAGE, PAD, QUESTIONS, SPECIAL_TOKENS, WHAT_IS_SHOWN, llava_prompt,
                                 qa_pairs)
from .clip import scheduled_steps, with_eager_attention
from .pool import Pool, normalise

TOKEN_ID = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
# How often each question kind is drawn. Colour is learnt in a few steps; shape (which must be read from
# the spatial pattern of patch tokens) and captions (every object's shape) need most of the steps.
KIND_WEIGHTS = {"shape": 0.3, "colour": 0.08, "caption": 0.45, "size": 0.04, "position": 0.04,
                "texture": 0.05, "count": 0.04}


def build_llava(clip_model, cfg: dict, vocab_size: int):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = clip_model.config.vision_config
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg["hidden"], intermediate_size=3 * cfg["hidden"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=128, pad_token_id=TOKEN_ID[PAD], bos_token_id=TOKEN_ID[BOS],
                       eos_token_id=TOKEN_ID[EOS], tie_word_embeddings=False)
    n_patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=TOKEN_ID[IMAGE],
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=n_patches, projector_hidden_act="gelu",
                         pad_token_id=TOKEN_ID[PAD], tie_word_embeddings=False)
    model = with_eager_attention(LlavaForConditionalGeneration(config))
    model.model.vision_tower.load_state_dict(clip_model.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = TOKEN_ID[BOS], TOKEN_ID[EOS], TOKEN_ID[PAD]
    gen.do_sample = False
    return model


@torch.inference_mode()
def vision_features(model, pool: Pool, batch: int = 500) -> torch.Tensor:
    """What the language side sees of each pool image: hidden_states[-2] without CLS, (N, P, D)."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    out = []
    for s in progress_bar(range(0, len(pool), batch), desc="tiny LLaVA vision features", leave=False):
        hs = tower(pixel_values=normalise(pool.pixels[s:s + batch]), output_hidden_states=True).hidden_states
        out.append(hs[layer][:, 1:].clone())
    return torch.cat(out)


def train_llava(model, tokenizer, pool: Pool, cfg: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    feats = vision_features(model, pool)
    kind_weights = cfg.get("kind_weights", KIND_WEIGHTS)
    kinds = list(kind_weights)
    # each image's (question, answer) pairs by kind; a kind is one rng.random() against the normalised
    # cdf: the draws rng.choice(len(kinds), p=...) made here until 2026-12-02, without its 27 us of checks
    options = [{kind: [(q, a) for k, q, a in qa_pairs(f, m) if k == kind] for kind in kinds}
               for f, m in zip(pool.factors, pool.masks)]
    cdf = np.array([kind_weights[k] for k in kinds], np.float64)
    cdf = (cdf / cdf.sum()).cumsum()
    cdf /= cdf[-1]
    n_img = feats.shape[1]
    image_run = IMAGE * n_img
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0, betas=(0.9, 0.98))
    steps, bs = cfg["steps"], cfg["batch"]
    cache = {}
    lm = model.model.language_model
    embed = model.get_input_embeddings()
    model.train()
    t0 = time.time()
    for step, bar in scheduled_steps(opt, steps, cfg["lr"], "train tiny LLaVA"):
        idx = torch.randint(len(pool), (bs,), generator=g).numpy()
        seqs, starts = [], []
        for i in idx:
            kind = kinds[int(cdf.searchsorted(rng.random(), side="right"))]
            pairs = options[i][kind]
            key = q, a = pairs[int(rng.integers(len(pairs)))]
            if key not in cache:
                prompt = tokenizer(llava_prompt(q).replace(IMAGE, image_run))["input_ids"]
                answer = tokenizer(a, add_special_tokens=False)["input_ids"] + [TOKEN_ID[EOS]]
                cache[key] = (prompt + answer, len(prompt))
            seq, start = cache[key]
            seqs.append(seq)
            starts.append(start)
        lengths, starts = np.array([len(seq) for seq in seqs]), np.array(starts)
        width = int(lengths.max())
        ids = torch.from_numpy(np.array([seq + [TOKEN_ID[PAD]] * (width - len(seq)) for seq in seqs], np.int64))
        pos = np.arange(width)
        attn = torch.from_numpy((pos < lengths[:, None]).astype(np.int64))
        answer = torch.from_numpy((pos >= starts[:, None]) & (pos < lengths[:, None]))
        labels = torch.where(answer, ids, -100)
        x = embed(ids)
        proj = model.model.multi_modal_projector(feats[idx])
        x = x.masked_scatter((ids == TOKEN_ID[IMAGE]).unsqueeze(-1), proj.to(x.dtype))
        hidden = lm(inputs_embeds=x, attention_mask=attn).last_hidden_state
        logits = model.lm_head(hidden[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return {"steps": steps, "final_loss": round(float(loss.item()), 4), "train_s": round(time.time() - t0, 1)}


def object_pairs(text: str, colours, shapes) -> list:
    """(colour, shape) pairs a caption names, in order: each shape word with the colour word before it."""
    out, colour = [], None
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in colours:
            colour = word
        elif word in shapes:
            out.append((colour, word))
            colour = None
    return out


@torch.inference_mode()
def generate(model, processor, images, question: str, max_new_tokens: int, batch: int = 250) -> list:
    """Greedy answers of the saved model through its processor (left-padded batches)."""
    prompt = llava_prompt(question)
    answers = []
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def evaluate_llava(model, processor, pool: Pool, colours, shapes) -> dict:
    """Gate figures on a pool: one-word shape and colour answers (single-object images, first word)
    and captions that name the right colour and shape of every object (all images)."""
    from PIL import Image

    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pool.pixels]
    single = pool.single()
    first = lambda a: (re.findall(r"[a-z]+", a.lower()) or [""])[0]  # noqa: E731
    shape_ans = generate(model, processor, [images[i] for i in single], WHAT_IS_SHOWN, 3)
    colour_ans = generate(model, processor, [images[i] for i in single], QUESTIONS["colour"][0], 3)
    captions = generate(model, processor, images, QUESTIONS["caption"][0], 28)
    shape_ok = [first(a) == pool.factors[i]["objects"][0]["shape"] for a, i in zip(shape_ans, single)]
    colour_ok = [first(a) == pool.factors[i]["objects"][0]["colour"] for a, i in zip(colour_ans, single)]
    caption_ok = [sorted(object_pairs(c, colours, shapes)) ==
                  sorted((o["colour"], o["shape"]) for o in f["objects"]) for c, f in zip(captions, pool.factors)]
    return {"shape_acc": float(np.mean(shape_ok)), "colour_acc": float(np.mean(colour_ok)),
            "caption_acc": float(np.mean(caption_ok)), "n_single": int(len(single)), "n_images": len(pool),
            "examples": [{"index": int(pool.indices[i]), "caption": captions[i]} for i in range(3)]}
