"""The Steer page's service: one steering session (one LLaVA + the bundle's SAE) loaded on first use."""
from __future__ import annotations

import threading
import time

import numpy as np

from sae_core.errors import UserError, integer_text

from . import inputs
from .explorer import MAX_TABLE_ROWS, Explorer, _num
from .render import fitted_size, patch_grid
from .uploads import UploadLimits, load_upload

SWEEP_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The strength-sweep strip: every chosen latent clamped at s x its largest activation on one token (token_max,
the sliders' unit), for each s."""
DEFAULT_QUESTIONS = (
    "What is shown in this image? Use exactly one word!",
    "What colour is the shape? Use one word.",
    "Describe the image.",
)
STEER_PICTURE = 320
LATENT_ROWS = 10
"""The Steer page lists this many of the latents that fire most on its image."""
# "x token max": the latent's strongest patch here in the strength sliders' unit (its largest activation on one
# token of the dataset), so that a strength can be read against what the image already gives.
LATENT_COLUMNS = ["neuron", "label", "max on image", "x token max", "mean", "patch", "ms"]  # max, mean, best patch: over patches


def unused_slot(k) -> bool:
    """A latent slot left unused: -1, as the box says ("-1 = unused"), as a number or as text, or nothing. Any other
    negative id is refused by `Explorer.check_neuron` (until 2026-12-05 every one, -5 or -1e300, meant unused)."""
    if k is None or (isinstance(k, str) and not k.strip()):
        return True
    if isinstance(k, (bool, np.bool_)):
        return False
    if isinstance(k, str):
        return integer_text(k) == -1
    try:
        return float(k) == -1
    except (TypeError, ValueError, OverflowError):
        return False  # check_neuron names what is wrong with it


class ModelUnavailable(UserError):
    """The steering model (LLaVA) could not be loaded: a hub id without the network, too little memory, ..."""


RETRY_LOAD_AFTER_S = 60.0
"""A failed load of the steering model is answered from memory for this long before it is tried again: a
7B LLaVA that ran out of memory was loaded again (and ran out again) at every Steer request."""


class SteerService:
    """Loads `sae_core.steering.SteeringSession` once (lazily, under a lock) and answers the Steer page.

    Strengths are in units of each neuron's largest activation on one token of the bundle's dataset
    (`token_max`: a clamp sets tokens, and an image score such as the CLS activation can be several
    times smaller), so one slider range suits every neuron; they are bounded to +-inputs.CLAMP_FACTOR.
    """

    def __init__(self, explorer: Explorer, device: str = "auto", precision: str = "auto",
                 limits: UploadLimits = UploadLimits(), llava: str | None = None, coder=None):
        from .search import BundleCoder

        self.ex = explorer
        self.llava = llava  # None: the bundle's own (sae_core.steering.bundle_llava_spec)
        self.coder = coder or BundleCoder(explorer)  # the Neurons page's search by image: no LLaVA needed
        self.device = device
        self.precision = precision  # as `precompute steer --precision`
        self.limits = limits
        self._session = None
        self._failed: tuple[float, str] | None = None  # (when, why) of the last failed load
        self._lock = threading.Lock()

    def other_tower(self) -> str | None:
        """sae_core.steering.other_tower_warning for the bundle's SAE and the LLaVA this page steers."""
        from sae_core.steering import bundle_llava_spec, other_tower_warning

        b = self.ex.bundle
        return other_tower_warning(b.local_spec(b.manifest["model"].get("spec") or ""),
                                   self.llava or bundle_llava_spec(b))

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def session(self):
        """The steering session, loaded at the first call. A failed load raises ModelUnavailable, and so does every
        call for RETRY_LOAD_AFTER_S after it; the first call after that tries again (the network may be back)."""
        with self._lock:
            if self._session is None:
                from sae_core.precision import out_of_memory
                from sae_core.steering import SteeringSession, bundle_llava_spec, lighter_precisions

                if self._failed and time.monotonic() - self._failed[0] < RETRY_LOAD_AFTER_S:
                    raise ModelUnavailable(self._failed[1])
                why = "the steering model cannot be loaded, so the Steer page cannot answer (the other pages work)"
                try:
                    self._session = SteeringSession.from_bundle(self.ex.bundle, device=self.device,
                                                                precision=self.precision, llava=self.llava)
                except UserError as e:  # the app's own way to name another LLaVA, which the library's sentence lacks
                    which = self.llava or bundle_llava_spec(self.ex.bundle)
                    message = (f"{why}: {str(e).rstrip('.')} (the app loads {which}; "
                               "--llava or SAE_APP_LLAVA names another).")
                except (MemoryError, RuntimeError) as e:
                    said = out_of_memory(e)
                    if said is None:
                        raise
                    lighter = lighter_precisions(self.precision)
                    lighter = f" or a lighter precision (SAE_APP_PRECISION={lighter})" if lighter else ""
                    message = (f"{why}: it ran out of memory on {self.device} ({said}); free memory, or use a larger "
                               f"device{lighter} and restart the app (a load is tried again after "
                               f"{RETRY_LOAD_AFTER_S:.0f} s).")
                else:
                    self._failed = None
                    return self._session
                self._failed = (time.monotonic(), message)
                raise ModelUnavailable(message)
            return self._session

    # --- images --------------------------------------------------------------------------------
    def image(self, image_index, upload):
        """(PIL image, key for the session, state dict) of dataset image `image_index` (>= 0), or of the
        upload when the index is -1 or empty (the index box says so; an upload sets it to -1)."""
        i = -1 if image_index in (None, "") else inputs.integer(image_index, "image index", -1, self.ex.n_images - 1)
        if i >= 0:
            if self.ex.dataset_error:  # its advice is for the command line; the page can take an upload
                raise UserError(f"dataset image {i} cannot be steered here, as the bundle's dataset cannot be opened "
                                f"({self.ex.dataset_error.rstrip('.')}); upload an image instead.")
            return self.ex.bundle.image(i), i, {"image": i}
        if upload in (None, ""):
            raise UserError(f"no image chosen; give a dataset image index (0 to {self.ex.n_images - 1}) or upload "
                            "an image.")
        pil = load_upload(upload, self.limits)
        return pil, pil, {"image": None}

    def picture_size(self, pil) -> tuple[int, int]:
        """(w, h) of `picture(pil)`: the model's view of `pil` fitted into STEER_PICTURE pixels."""
        return fitted_size(self.ex.shown(pil).size, STEER_PICTURE)

    def picture(self, pil, selected=(), heat=None, vmax: float = 1.0) -> str:
        """The steering image as the model sees it, with its patch grid (and a latent's map), as a PNG path."""
        import hashlib

        # the size and mode too: a 32x64 and a 64x32 picture can hold the same bytes (another user's picture
        # was served for the second)
        digest = hashlib.sha1(f"{pil.mode}{pil.size}".encode() + pil.tobytes()).hexdigest()[:16]
        heat_key = None if heat is None else f"{hashlib.sha1(np.asarray(heat).tobytes()).hexdigest()[:12]}/{vmax!r}"
        key = f"steer|{digest}|{sorted(selected)}|{heat_key}"  # vmax draws the map too
        return self.ex.images.get_or_make(key, lambda: patch_grid(self.ex.shown(pil), self.ex.grid, selected, heat,
                                                                   vmax, size=STEER_PICTURE))

    def latents(self, key, top: int = LATENT_ROWS) -> tuple[list[list], dict]:
        """Rows of the latents that fire most on an image (LATENT_COLUMNS) and their patch maps."""
        found = self.session().latents_on_image(key, top=top)
        ms = self.ex.columns["ms"]
        rows = []
        for k, mx, mean, label in found["top"]:
            m = found["maps"][k].reshape(-1)
            rows.append([k, label, _num(mx), _num(mx / self.strength_unit(k)), _num(mean), int(np.argmax(m)),
                         _num(ms[k])])
        return rows, found["maps"]

    def fire_on_upload(self, path, top: int = 20) -> dict:
        """Image search: which neurons fire most on an uploaded image, and where (the top one's map)."""
        pil = load_upload(path, self.limits)
        found = self.coder.latents(pil, top=top)
        if not found["top"]:
            return {"table": self.ex.table(ids=[]), "picture": None, "note": "No neuron fires on this image."}
        ids = [k for k, *_ in found["top"]]
        table = self.ex.table(ids=ids, limit=MAX_TABLE_ROWS)
        table = table.set_index("neuron").loc[ids].reset_index()
        table.insert(1, "act_on_image", [_num(mx) for _, mx, *_ in found["top"]])
        top_map = found["maps"][ids[0]]
        picture = self.picture(pil, heat=top_map.reshape(-1), vmax=float(top_map.max()) or 1.0)
        # the count is of every latent firing on a patch: until 2026-12-05 it was the table's rows, "20" for 25
        n = found["n_firing"]
        listed = ("it is listed" if n == 1 else f"all {n} are listed" if n == len(ids)
                  else f"the {len(ids)} that fire most are listed")
        return {"table": table, "picture": picture,
                "note": f"{n} {'neuron fires' if n == 1 else 'neurons fire'} on the image's patches ({listed}); "
                        f"the picture shows where neuron {ids[0]} fires."}

    # --- steering -------------------------------------------------------------------------------
    def strength_unit(self, k: int) -> float:
        """The activation a strength of 1 clamps latent k to: its largest on one token of the dataset (1 if it
        never fired; `Bundle.strength_units`)."""
        return float(self.ex.columns["strength_unit"][k])

    def clamps(self, latents, strengths) -> tuple[list[int], list[float], list[float], list[str]]:
        """Checked latents and strengths -> (latents, strengths, raw values, notes about bounded values)."""
        lat, vals, raw, notes = [], [], [], []
        for k, s in zip(latents, strengths):
            if unused_slot(k):
                continue
            k = self.ex.check_neuron(k)
            if k in lat:
                raise UserError(f"neuron {k} is chosen twice; choose each latent once.")
            v, bounded = inputs.clamp_value(s, 1.0, what=f"strength of neuron {k}")
            if bounded:
                notes.append(f"strength of neuron {k} bounded to {v:g} (the range is +-{inputs.CLAMP_FACTOR:g} "
                             "times its largest activation on one token)")
            lat.append(k), vals.append(v), raw.append(v * self.strength_unit(k))
        if len(lat) > inputs.MAX_LATENTS:
            raise UserError(f"{len(lat)} latents were chosen; clamp at most {inputs.MAX_LATENTS} at once.")
        return lat, vals, raw, notes

    def checked_request(self, latents, strengths, question: str, max_new_tokens: int):
        """A steer request's (latents, strengths, raw values, notes about bounded values, question, answer
        length), each checked (UserError, one sentence); the model is not needed for it."""
        lat, strength, raw, notes = self.clamps(latents, strengths)
        if not lat:
            raise UserError("no latent chosen; pick at least one neuron id to clamp.")
        question = inputs.text(question, "question", inputs.MAX_QUESTION_CHARS) or DEFAULT_QUESTIONS[0]
        n_tokens = inputs.integer(max_new_tokens, "answer length", 1, inputs.MAX_NEW_TOKENS)
        return lat, strength, raw, notes, question, n_tokens

    def steer(self, key, latents, strengths, patches, keep_error: bool, question: str, sweep: bool,
              max_new_tokens: int, progress=None) -> dict:
        """Three answers, the sweep strip and the steering scores for one request."""
        lat, strength, raw, notes, question, n_tokens = self.checked_request(latents, strengths, question,
                                                                             max_new_tokens)
        keep_error, sweep = inputs.yes_no(keep_error, "keep_error"), inputs.yes_no(sweep, "sweep")
        patches = patches or None
        s = self.session()
        if progress:
            progress(0.1, desc="three answers")
        res = s.answers(key, lat, raw, prompt=question, keep_error=bool(keep_error), patches=patches,
                        max_new_tokens=n_tokens)
        strip = []
        if sweep:
            if progress:
                progress(0.5, desc="strength sweep")
            maxes = [self.strength_unit(k) for k in lat]  # the rows are in strength units, whatever the sliders say
            values_list = [[st * m for m in maxes] for st in SWEEP_STRENGTHS]
            for st, (_, answer) in zip(SWEEP_STRENGTHS, s.sweep(key, lat, values_list, prompt=question,
                                                              keep_error=bool(keep_error), patches=patches,
                                                              max_new_tokens=n_tokens)):
                strip.append([st, answer])
        if progress:
            progress(0.85, desc="steering score")
        scores = self.scores(s, res, lat[0])
        return {"original": res.original, "sae": res.sae, "steered": res.steered, "sweep": strip,
                "scores": scores, "clamp": res.clamp, "strengths": strength, "notes": notes,
                "elapsed_ms": round(res.elapsed_ms, 1)}

    @staticmethod
    def scores(session, res, latent: int) -> dict:
        """CLIP cosine between each answer and the latent's top images (the paper's steering score);
        the steered score above the original's means the answer moved toward the neuron's concept."""
        out = {}
        try:
            for name in ("original", "steered"):
                answer = getattr(res, name).strip()
                out[name] = round(session.steering_score(answer, latent), 4) if answer else None
        except (UserError, ImportError) as e:  # no bundle embeddings, or the scorer's module is absent
            out["unavailable"] = str(e)
        return out
