"""The tiny CLIP: config, contrastive training on (image, text) pairs, zero-shot evaluation."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from sae_core.progress import progress_bar
from sae_core.world.text import BOS, EOS, PAD, colour_prompt, shape_prompt, training_text
from .pool import FACTOR_CODES, Pool, normalise


def build_clip(cfg: dict, image_size: int, vocab_size: int):
    from transformers import CLIPConfig, CLIPModel

    from sae_core.world.text import SPECIAL_TOKENS
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = dict(vocab_size=vocab_size, hidden_size=cfg["text_hidden"], intermediate_size=4 * cfg["text_hidden"],
                num_hidden_layers=cfg["text_layers"], num_attention_heads=4,
                max_position_embeddings=cfg["max_text_len"], pad_token_id=ids[PAD], bos_token_id=ids[BOS],
                eos_token_id=ids[EOS])
    vision = dict(hidden_size=cfg["hidden"], intermediate_size=4 * cfg["hidden"], num_hidden_layers=cfg["layers"],
                  num_attention_heads=cfg["heads"], image_size=image_size, patch_size=cfg["patch"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg["proj"])
    return with_eager_attention(CLIPModel(config))


def with_eager_attention(model):
    """Train with plain matmul-softmax attention: at these sequence lengths (17 image tokens, ~10 text
    tokens) PyTorch's CPU flash-attention kernel took 31% of a demo CLIP training step in a profile,
    and the demo CLIP trains 1.2-1.4x faster without it (the LLaVA about 1.07x). transformers does not
    save the choice: a saved model loads with its default attention, which computes the same function."""
    model.set_attn_implementation("eager")
    return model


def claim_matrix(pool: Pool, idx: np.ndarray, claims: list, texts: list) -> np.ndarray:
    """truth[t, b]: does text t (with its claim) describe image idx[b]? Decided from factor codes.

    Object claims are matched through one (text, value) table per factor and captions by a lookup: a
    text at a time, this took 3.5 ms of a demo CLIP step's 12 ms of data preparation."""
    from sae_core.world.generator import TEXTURES

    truth = np.zeros((len(claims), len(idx)), bool)
    names = list(FACTOR_CODES)
    codes = np.stack([pool.codes[name][idx] for name in names], -1)  # (B, 2, factors), -1: no second object
    want = np.full((len(claims), len(names)), -2)  # -2: the claim does not name that factor
    is_object = np.zeros(len(claims), bool)
    by_caption: dict[str, list[int]] = {}
    for b, i in enumerate(idx):
        by_caption.setdefault(pool.captions[i], []).append(b)
    texture = pool.texture[idx]
    for t, claim in enumerate(claims):
        if claim.get("exact"):
            truth[t, by_caption.get(texts[t], [])] = True
        elif "texture" in claim:
            truth[t] = texture == TEXTURES.index(claim["texture"])
        else:
            is_object[t] = True
            for name, value in claim["object"].items():
                want[t, names.index(name)] = FACTOR_CODES[name].index(value)
    want = want[is_object]
    ok = np.ones((len(want), len(idx), 2), bool)  # (T', B, objects)
    for f, name in enumerate(names):  # per factor, a (text, value) table read at the batch's codes
        values = np.arange(len(FACTOR_CODES[name]))
        table = (want[:, f, None] == values) | (want[:, f, None] == -2)
        table = np.concatenate([table, np.zeros((len(want), 1), bool)], 1)  # code -1 (no second object): False
        ok &= table[:, codes[:, :, f]]
    truth[is_object] = ok.any(-1)
    return truth


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))


def scheduled_steps(opt, steps: int, peak: float, desc: str):
    """Yield (step, progress bar) with the learning rate set: 5% linear warm-up, then cosine to 2%."""
    warmup = max(1, int(0.05 * steps))
    bar = progress_bar(range(steps), desc=desc, unit="step", mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak, warmup)
        yield step, bar


def train_clip(model, tokenizer, pool: Pool, cfg: dict, seed: int, log=None) -> dict:
    """Contrastive training with several positives per text (all batch images a text describes).

    Texts are full captions or partial descriptions naming one or two factors, so a batch cannot be
    solved by colour alone; identical texts in a batch are encoded once and count as one column.
    """
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"], betas=(0.9, 0.98))
    steps, bs = cfg["steps"], cfg["batch"]
    model.train()
    cache = {}
    t0 = time.time()
    for step, bar in scheduled_steps(opt, steps, cfg["lr"], "train tiny CLIP"):
        idx = torch.randint(len(pool), (bs,), generator=g).numpy()
        pairs = [training_text(pool.factors[i], rng, cfg["full_caption_prob"]) for i in idx]
        texts, claims, own = [], [], []
        seen = {}
        for text, claim in pairs:
            if text not in seen:
                seen[text] = len(texts)
                texts.append(text)
                claims.append(claim)
            own.append(seen[text])
        truth = torch.from_numpy(claim_matrix(pool, idx, claims, texts)).float()  # (T, B)
        missing = [t for t in texts if t not in cache]
        if missing:
            enc = tokenizer(missing)["input_ids"]
            cache.update(zip(missing, enc))
        ids = [cache[t] for t in texts]
        lengths = np.array([len(seq) for seq in ids])
        width = int(lengths.max())
        input_ids = torch.from_numpy(np.array([seq + [0] * (width - len(seq)) for seq in ids], np.int64))
        attn = torch.from_numpy((np.arange(width) < lengths[:, None]).astype(np.int64))
        img = model.get_image_features(pixel_values=normalise(pool.pixels[idx]))
        txt = model.get_text_features(input_ids=input_ids, attention_mask=attn)
        img = F.normalize(_tensor(img), dim=-1)
        txt = F.normalize(_tensor(txt), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * txt @ img.t()  # (T, B)
        t2i = -(F.log_softmax(logits, 1) * truth / truth.sum(1, keepdim=True)).sum(1).mean()
        i2t = -(F.log_softmax(logits, 0) * truth / truth.sum(0, keepdim=True)).sum(0).mean()
        loss = (t2i + i2t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", texts=len(texts), refresh=False)
        if log is not None and cfg.get("eval_every") and (step + 1) % cfg["eval_every"] == 0:
            log(step + 1, time.time() - t0, model)
    model.eval()
    return {"steps": steps, "final_loss": round(float(loss.item()), 4), "train_s": round(time.time() - t0, 1)}


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.inference_mode()
def zero_shot(model, tokenizer, pool: Pool, colours, shapes, batch: int = 500) -> dict:
    """Accuracy of picking an object's colour / shape from prompts, on the pool's single-object images."""
    model.eval()
    sel = pool.single()
    feats = []
    for s in range(0, len(sel), batch):
        feats.append(_tensor(model.get_image_features(pixel_values=normalise(pool.pixels[sel[s:s + batch]]))))
    img = F.normalize(torch.cat(feats), dim=-1)
    out = {}
    for name, values, prompt in (("colour", colours, colour_prompt), ("shape", shapes, shape_prompt)):
        enc = tokenizer([prompt(v) for v in values], padding=True, return_tensors="pt")
        txt = F.normalize(_tensor(model.get_text_features(**enc)), dim=-1)
        pred = (img @ txt.t()).argmax(1).numpy()
        truth = np.array([values.index(pool.factors[i]["objects"][0][name]) if pool.factors[i]["objects"][0][name]
                          in values else -1 for i in sel])
        out[f"{name}_acc"] = float((pred == truth).mean())
    out["n_images"] = int(len(sel))
    return out
