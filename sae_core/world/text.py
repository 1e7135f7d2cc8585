"""The embedded world's language: captions, question-answer pairs, prompts and a word-level tokenizer.

Everything here is a function of an image's factors (see generator.py). The vocabulary is the set of
words these functions can produce, so no world text ever tokenizes to `<unk>`.
"""
from __future__ import annotations

import itertools

import numpy as np

from .generator import COLOURS, PAIR_LAYOUTS, POSITIONS, SHAPES, SIZES, TEXTURES, main_object

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)  # ids 0..4; CLIP pools at the first EOS (id 3)
PLACE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "centre": "in the centre"}
COUNT_WORDS = {1: "one", 2: "two"}

# The paper's steering prompt and the questions the tiny LLaVA answers (question -> factor answered).
WHAT_IS_SHOWN = "What is shown in this image? Use exactly one word!"
QUESTIONS = {
    "shape": (WHAT_IS_SHOWN, "What shape is it? Use one word."),
    "colour": ("What colour is the shape? Use one word.", "What colour is it? Use one word."),
    "size": ("Is the shape large or small? Use one word.",),
    "position": ("Where is the shape? Use one word.",),
    "texture": ("What is the background like? Use one word.",),
    "count": ("How many shapes are there? Use one word.",),
    "caption": ("Describe the image.", "Write a short caption."),
}
CHAT_TEMPLATE = (  # the llava-1.5 format: "USER: <image>\n{prompt} ASSISTANT:"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava_prompt(question: str) -> str:
    """The prompt string the tiny LLaVA was trained on (LLaVA-1.5's format)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def object_phrase(obj: dict, with_place: bool = True) -> str:
    text = f"a {obj['size']} {obj['colour']} {obj['shape']}"
    return f"{text} {PLACE[obj['position']]}" if with_place else text


def caption(factors: dict) -> str:
    """'a large red star on the left , striped background' (objects in left-right/top-bottom order)."""
    objs = " and ".join(object_phrase(o) for o in factors["objects"])
    return f"{objs} , {factors['background']['texture']} background"


def colour_prompt(colour: str) -> str:
    return f"a photo of a {colour} object"


def shape_prompt(shape: str) -> str:
    return f"a photo of a {shape}"


# Partial descriptions for contrastive training: each names a few factors of one object (or only the
# background), so the text tower cannot match images by colour alone. A claim is a dict of the
# factors a text asserts; `claims_true` decides which images a text describes.
_PARTIAL = (
    ("shape",), ("shape",), ("colour",), ("colour",), ("colour", "shape"), ("size", "shape"),
    ("shape", "position"), ("colour", "position"), ("size", "colour", "shape"),
)


def _partial_text(obj: dict, keys: tuple) -> str:
    if keys == ("shape",):
        return shape_prompt(obj["shape"])
    if keys == ("colour",):
        return colour_prompt(obj["colour"])
    words = [obj[k] for k in ("size", "colour") if k in keys]
    noun = obj["shape"] if "shape" in keys else "object"
    text = " ".join(["a", *words, noun])
    return f"{text} {PLACE[obj['position']]}" if "position" in keys else text


def training_text(factors: dict, rng: np.random.Generator, full_prob: float = 0.3):
    """One text for contrastive training and its claim: the full caption or a partial description."""
    u = rng.random()
    if u < full_prob:
        return caption(factors), {"exact": True}
    if u < full_prob + 0.05:
        tex = factors["background"]["texture"]
        return f"{tex} background", {"texture": tex}
    obj = factors["objects"][int(rng.integers(len(factors["objects"])))]
    keys = _PARTIAL[int(rng.integers(len(_PARTIAL)))]
    return _partial_text(obj, keys), {"object": {k: obj[k] for k in keys}}


def qa_pairs(factors: dict, masks=None) -> list:
    """(kind, question, answer) for every question kind about an image's main object."""
    objs = factors["objects"]
    main = objs[main_object(factors, masks)]
    answers = {"shape": main["shape"], "colour": main["colour"], "size": main["size"],
               "position": main["position"], "texture": factors["background"]["texture"],
               "count": COUNT_WORDS[len(objs)], "caption": caption(factors)}
    out = []
    for kind, questions in QUESTIONS.items():
        for q in questions:
            out.append((kind, q, answers[kind]))
    if len(objs) == 2:  # ask about each object by its place
        for o in objs:
            out.append(("colour", f"What colour is the shape {PLACE[o['position']]}? Use one word.",
                        o["colour"]))
            out.append(("shape", f"What shape is {PLACE[o['position']]}? Use one word.", o["shape"]))
    return out


def _covering_texts():
    """Texts that together use every word any function above can produce."""
    for shape, colour, size, pos, tex in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, TEXTURES):
        obj = {"shape": shape, "colour": colour, "size": size, "position": pos}
        yield caption({"objects": [obj, obj], "background": {"texture": tex}})
        yield _partial_text(obj, ("size", "colour", "shape", "position"))
        yield _partial_text(obj, ("colour", "position"))
        yield colour_prompt(colour) + " " + shape_prompt(shape) + f" {tex} background"
    for pair in PAIR_LAYOUTS:
        for p in pair:
            yield f"What colour is the shape {PLACE[p]}? Use one word. What shape is {PLACE[p]}?"
    for questions in QUESTIONS.values():
        yield from questions
    yield " ".join(COUNT_WORDS.values())
    yield llava_prompt("")


def vocabulary() -> list:
    """Special tokens then every word, sorted: the same list on every machine."""
    from tokenizers.pre_tokenizers import Whitespace

    pre = Whitespace()
    words = set()
    for text in _covering_texts():
        words.update(w for w, _ in pre.pre_tokenize_str(text.replace(IMAGE, " ").lower()))
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer(add_eos: bool, model_max_length: int):
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()`.

    add_eos=True gives the CLIP text tokenizer ("<s> text </s>": CLIP pools at </s>); False gives the
    LLaVA one ("<s> text", as Llama tokenizers do). `<image>` is a special token in both.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ,"
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    single = f"{BOS} $A {EOS}" if add_eos else f"{BOS} $A"
    special = [(BOS, vocab[BOS])] + ([(EOS, vocab[EOS])] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, model_max_length=model_max_length,
        padding_side="right" if add_eos else "left")
