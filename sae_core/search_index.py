"""FAISS index over unit-norm image embeddings for search by text and by image, with measured recall.

API
    build_index(embeddings, exact_threshold=100_000, nlist=None, m=None, nbits=8, rerank=10,
                target_recall=0.95, recall_k=10, n_recall_queries=1000, seed=0, train_size=None,
                text_queries=None, progress=False) -> SearchIndex
        embeddings: (N, d) float16/float32 array (a memmap is fine), unit-norm rows.
        N < exact_threshold: exact inner-product search (faiss.IndexFlatIP), recall 1 by construction.
        Otherwise IVF-PQ (faiss.IndexIVFPQ, inner product) with nlist/m from `ivfpq_params(N, d)`:
        it proposes rerank * k candidates, re-scored exactly against `embeddings` (only those rows are
        read, so a memory-mapped float16 file serves). Starting at nprobe 8 and the given rerank,
        nprobe is doubled while that gains recall (up to nlist // 4), else rerank is doubled (up to
        64), until recall@recall_k against exact search (sampled database rows as queries) reaches
        target_recall. `text_queries` (Q, d), e.g. the text embeddings of the label vocabulary, are
        tuned for too (the worst of the two sets must reach the target), with a result counted as
        found when it is in the exact top-(10 k) (TEXT_POOL): text queries lie off the image
        manifold and need more probing than image queries. Recall without re-ranking is reported.
    SearchIndex
        .index        the faiss index (nprobe set; it is stored in the file)
        .kind         "flat" | "ivfpq"
        .embeddings   (N, d) rows used to re-rank IVF-PQ candidates, or None (PQ scores only)
        .rerank       candidates per wanted result for re-ranking (IVF-PQ only)
        .info         JSON-able dict: kind, n, d, nlist, m, nbits, nprobe, rerank, recall {k, value,
                      value_pq_only, n_queries, tried, and with text queries value_text, text_pool,
                      value_text_strict, n_text_queries}, build_s
                      (for the bundle's manifest)
        .search(queries (Q, d) or (d,), k=10) -> (ids int64 (Q, k), scores float32 (Q, k)), best
                      first; ids -1 and scores -inf pad rows when fewer than k results exist (faiss is
                      asked for at most N); UserError for a non-finite query or a k that is not an integer >= 1
        .save(path)   the index's bytes to a temporary name, then rename (atomic); `info` goes beside
                      it as PATH.json (also atomic) so that load_index knows rerank and recall
    load_index(path, embeddings=None) -> SearchIndex
                      faiss.read_index (+ PATH.json when present); pass the bundle's
                      images/embeddings.npy (memory-mapped) so that IVF-PQ results are re-ranked
                      exactly; UserError if missing, unreadable or of another shape
    ivfpq_params(n, d) -> (nlist, m)         the size rule (see its docstring)
    recall_at_k(index_or_search, embeddings, queries, k, exact_ids=None, pool=None) -> float
        mean over queries of |approx top-k ∩ exact top-pool| / k  (pool = k: recall@k)
    exact_topk(embeddings, queries, k, chunk=65536) -> (ids, scores)   brute-force reference (numpy BLAS)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path, write_json_atomic
from .errors import UserError, is_count

TEXT_POOL = 10
"""Text queries count a result as found when it is in the exact top-(TEXT_POOL * k): a text prompt
is about equally close to hundreds of images (on the world's CLIP the exact top-1 and top-100 of a
prompt differ by 0.03 in cosine, against 0.18 for an image query), so its exact top-k order is
mostly noise and strict recall@k says little about what the user sees."""
EXACT_THRESHOLD = 100_000
"""Below this many images the index is exact: a flat search of 100k x 768 float32 is about 300 MB and
a few ms per query on one core, and IVF-PQ would save little while losing recall."""


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is in requirements.txt
        raise UserError("the search index needs faiss; install it with `pip install faiss-cpu`.") from e
    return faiss


def _as_f32(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    return np.ascontiguousarray(x, dtype=np.float32)


def ivfpq_params(n: int, d: int) -> tuple[int, int]:
    """nlist and m for N vectors of dimension d.

    nlist: the power of two nearest 4*sqrt(N) (the usual FAISS guideline, lists of about sqrt(N)/4
    vectors), capped at N // 64 so that k-means sees at least 64 training points per centroid
    (FAISS warns below 39). m: the largest divisor of d that is at most d / 8, so each sub-quantizer
    codes 8 dimensions (or a few more) in one byte: 16 x smaller than float16. PQ alone then finds
    about half of the true top-10 (measured on clustered data, d 64: 0.42 at m = d/8, 0.65 at
    m = d/4), which is why candidates are re-ranked exactly; with 10 x candidates re-ranked m = d/8
    reached 0.95 and trained 12 x faster than m = d/4 (1.7 s against 20 s for 20k x 64, one core).
    """
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n // 64))
    m = max(i for i in range(1, max(1, d // 8) + 1) if d % i == 0)
    return int(nlist), int(m)


def exact_topk(embeddings, queries, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner products with numpy: (ids int64 (Q, k), scores float32 (Q, k))."""
    q = _as_f32(queries)
    n = len(embeddings)
    k_eff = min(k, n)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s in range(0, n, chunk):
        block = np.asarray(embeddings[s:s + chunk], dtype=np.float32)
        sc = q @ block.T
        cand_s = np.concatenate([best_s, sc], 1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + len(block)), sc.shape)], 1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k_eff]
        best_s = np.take_along_axis(cand_s, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    if k_eff < k:  # pad like faiss does
        best_i = np.concatenate([best_i, np.full((len(q), k - k_eff), -1, np.int64)], 1)
        best_s = np.concatenate([best_s, np.full((len(q), k - k_eff), -np.inf, np.float32)], 1)
    return best_i, best_s


def recall_at_k(index_or_search, embeddings, queries, k: int, exact_ids: np.ndarray | None = None,
                pool: int | None = None) -> float:
    """Mean over queries of the fraction of the approximate top-k that is in the exact top-`pool`
    (pool = k, the default: the usual recall@k; exact_ids then needs at least `pool` columns)."""
    search = index_or_search.search if hasattr(index_or_search, "search") else index_or_search
    pool = pool or k
    if exact_ids is None:
        exact_ids, _ = exact_topk(embeddings, queries, pool)
    approx_ids, _ = search(_as_f32(queries), k)
    hits = []
    for a, e in zip(np.asarray(approx_ids), exact_ids[:, :pool]):
        e = e[e >= 0]
        hits.append(len(set(a[a >= 0].tolist()) & set(e.tolist())) / max(1, min(k, len(e))))
    return float(np.mean(hits)) if hits else 1.0


@dataclass
class SearchIndex:
    """A faiss index and how it was built (see the module docstring)."""

    index: object
    kind: str
    info: dict = field(default_factory=dict)
    embeddings: object = None
    """(N, d) rows for exact re-ranking of IVF-PQ candidates; None = PQ scores only."""
    rerank: int = 10

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(Q, d) or (d,) unit-norm queries -> (ids int64 (Q, k), inner products float32 (Q, k)), best first."""
        q = _as_f32(queries)
        if q.shape[1] != self.d:
            raise UserError(f"query vectors have dimension {q.shape[1]} but the index holds dimension {self.d}; "
                            "embed queries with the bundle's embedder.")
        if not is_count(k):
            raise UserError(f"k={k!r} must be a whole number of results, at least 1.")
        if not np.isfinite(q).all():  # faiss returns arbitrary ids for a NaN query
            raise UserError("a query vector holds NaN or an infinity; embed the query again (an all-zero vector "
                            "normalised to unit length gives NaN).")
        # faiss allocates (Q, k) per call, and the re-ranking k * rerank rows: ask for no more than the index holds
        k, wanted = max(1, min(int(k), self.n)), int(k)
        if self.kind == "ivfpq" and self.embeddings is not None and self.rerank > 1:
            ids, scores = self._search_reranked(q, k)
        else:
            scores, ids = self.index.search(q, k)
            ids, scores = ids.astype(np.int64), np.where(ids < 0, -np.inf, scores).astype(np.float32)
        if wanted > k:  # padded as faiss pads: the contract is (Q, k) whatever the index holds
            ids = np.concatenate([ids, np.full((len(q), wanted - k), -1, np.int64)], 1)
            scores = np.concatenate([scores, np.full((len(q), wanted - k), -np.inf, np.float32)], 1)
        return ids, scores

    def _search_reranked(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, cand = self.index.search(q, k * self.rerank)  # (Q, C), -1 where fewer were found
        valid = cand >= 0
        flat = np.where(valid, cand, 0).ravel()
        order = np.argsort(flat, kind="stable")  # sorted reads are kinder to a memory-mapped file
        vecs = np.empty((len(flat), self.d), np.float32)
        vecs[order] = np.asarray(self.embeddings[flat[order]], dtype=np.float32)
        scores = np.einsum("qcd,qd->qc", vecs.reshape(*cand.shape, self.d), q)
        scores = np.where(valid, scores, -np.inf)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(cand, top, 1).astype(np.int64)
        sc = np.take_along_axis(scores, top, 1).astype(np.float32)
        return np.where(np.isfinite(sc), ids, -1), sc

    def save(self, path: str | Path) -> None:
        """The index's bytes (faiss.serialize_index, what faiss.write_index writes) to a temporary name beside `path`,
        then renamed. Written from Python, whose writes fail loudly: faiss.write_index writes through a C stream of
        its own, and a short write on a full disk left a cut index renamed into place with only "close error: File
        too large" printed (until 2026-12-05)."""
        faiss = _faiss()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(faiss.serialize_index(self.index).tobytes())
        write_json_atomic(info_path(path), {**self.info, "rerank": self.rerank})


def info_path(path: str | Path) -> Path:
    """Where SearchIndex.save writes `info` beside the index file: PATH.json."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_info(path: str | Path) -> dict:
    """The settings SearchIndex.save wrote beside the index at `path` ({} when there are none); UserError
    when that file is damaged."""
    side = info_path(path)
    try:
        info = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
    except (OSError, ValueError, RecursionError) as e:  # written atomically: damaged afterwards (a copy cut short)
        raise UserError(f"{side} cannot be read as JSON ({e}); copy the bundle again or rebuild it.") from None
    rerank = info.get("rerank", 10) if isinstance(info, dict) else None
    if type(rerank) is not int or rerank < 1:
        raise UserError(f"{side} is not the index's settings (an object with a whole rerank of at least 1); copy the "
                        "bundle again or rebuild it.")
    return info


def _kind_of(index) -> str:
    faiss = _faiss()
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    return "flat" if isinstance(index, faiss.IndexFlat) else type(index).__name__


def load_index(path: str | Path, embeddings=None) -> SearchIndex:
    """Read an index written by SearchIndex.save (nprobe is stored in the file).

    `embeddings`: the (N, d) rows the index was built from (the bundle's memory-mapped
    images/embeddings.npy), used to re-rank IVF-PQ candidates exactly."""
    faiss = _faiss()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search index {path} does not exist; rebuild the bundle with `python -m precompute atlas`.")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise UserError(f"search index {path} cannot be read ({str(e).splitlines()[0]}); rebuild the bundle.") from e
    kind = _kind_of(index)
    if embeddings is not None and tuple(embeddings.shape) != (index.ntotal, index.d):
        raise UserError(f"embeddings of shape {tuple(embeddings.shape)} do not match the index at {path} "
                        f"({index.ntotal} x {index.d}); rebuild the bundle.")
    info = read_info(path)
    rerank = info.get("rerank", 10)
    info.update(kind=kind, n=int(index.ntotal), d=int(index.d))
    if kind == "ivfpq":
        info.update(nlist=int(index.nlist), m=int(index.pq.M), nbits=int(index.pq.nbits), nprobe=int(index.nprobe))
    return SearchIndex(index, kind, info, embeddings, rerank)


def _add_in_chunks(index, embeddings, chunk: int = 65536, progress: bool = False) -> None:
    starts = range(0, len(embeddings), chunk)
    if progress:
        from .progress import progress_bar

        starts = progress_bar(starts, desc="index images", unit="chunk")
    for s in starts:
        index.add(_as_f32(embeddings[s:s + chunk]))


def build_index(embeddings, exact_threshold: int = EXACT_THRESHOLD, nlist: int | None = None, m: int | None = None,
                nbits: int = 8, rerank: int = 10, target_recall: float = 0.95, recall_k: int = 10,
                n_recall_queries: int = 1000, seed: int = 0, train_size: int | None = None,
                text_queries=None, progress: bool = False) -> SearchIndex:
    """Index (N, d) unit-norm embeddings: exact below `exact_threshold`, IVF-PQ at or above it."""
    faiss = _faiss()
    t0 = time.time()
    if getattr(embeddings, "ndim", 0) != 2 or len(embeddings) == 0:
        raise UserError("the search index needs a non-empty (N, d) array of image embeddings.")
    n, d = int(embeddings.shape[0]), int(embeddings.shape[1])
    if n < max(exact_threshold, 1):
        index = faiss.IndexFlatIP(d)
        _add_in_chunks(index, embeddings, progress=progress)
        info = {"kind": "flat", "n": n, "d": d, "recall": {"k": recall_k, "value": 1.0, "n_queries": 0,
                                                          "note": "exact search"}}
        info["build_s"] = round(time.time() - t0, 3)
        return SearchIndex(index, "flat", info)

    auto_nlist, auto_m = ivfpq_params(n, d)
    nlist, m = int(nlist or auto_nlist), int(m or auto_m)
    if d % m:
        raise UserError(f"PQ sub-quantizers m={m} must divide the embedding dimension {d}.")
    rng = np.random.default_rng(seed)
    n_train = min(n, train_size or max(64 * nlist, 2 ** nbits * 64, 20_000))
    train_rows = np.sort(rng.choice(n, size=n_train, replace=False))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.train(_as_f32(np.asarray(embeddings[train_rows])))
    _add_in_chunks(index, embeddings, progress=progress)
    out = SearchIndex(index, "ivfpq", {}, embeddings, rerank)
    pq_only = SearchIndex(index, "ivfpq", {}, None, 1)

    # Recall against exact search, for queries that look like search-by-image (database rows) and,
    # when given, text queries: those sit off the image manifold (the modality gap) and need more.
    q_rows = np.sort(rng.choice(n, size=min(n, n_recall_queries), replace=False))
    sets = {"image": (_as_f32(np.asarray(embeddings[q_rows])), recall_k)}
    if text_queries is not None and len(text_queries):
        sets["text"] = (_as_f32(text_queries), TEXT_POOL * recall_k)
    exact = {name: exact_topk(embeddings, q, pool)[0] for name, (q, pool) in sets.items()}

    def recalls(searcher) -> dict:
        return {name: round(recall_at_k(searcher, None, q, recall_k, exact[name], pool), 4)
                for name, (q, pool) in sets.items()}

    # Raise nprobe while it helps (true neighbours in unvisited lists), else the re-ranked pool
    # (neighbours visited but mis-ranked by PQ), until the worst query set meets the target.
    tried = {}
    nprobe, max_nprobe, max_rerank = min(8, nlist), max(1, nlist // 4), 64
    while True:
        index.nprobe, out.rerank = nprobe, rerank
        tried[(nprobe, rerank)] = recalls(out)
        value = min(tried[(nprobe, rerank)].values())
        if value >= target_recall:
            break
        wider = min(nprobe * 2, max_nprobe)
        if wider > nprobe:
            index.nprobe = wider
            gain = min(recalls(out).values()) - value
            if gain >= 0.005 or rerank >= max_rerank:
                nprobe = wider
                continue
            index.nprobe = nprobe
        if rerank >= max_rerank:
            break
        rerank = min(rerank * 2, max_rerank)
    index.nprobe, out.rerank = nprobe, rerank
    final = tried[(nprobe, rerank)]
    recall = {"k": recall_k, "value": final["image"], "value_pq_only": recalls(pq_only)["image"],
              "n_queries": int(len(q_rows)), "target": target_recall,
              "tried": [{"nprobe": p, "rerank": r, **v} for (p, r), v in tried.items()],
              "queries": "database rows (search by image)"}
    if "text" in sets:
        q = sets["text"][0]
        recall.update(value_text=final["text"], text_pool=TEXT_POOL * recall_k, n_text_queries=int(len(q)),
                      value_text_strict=round(recall_at_k(out, None, q, recall_k, exact["text"][:, :recall_k]), 4),
                      queries="database rows (search by image); the given text embeddings, counted as found "
                              f"when in the exact top-{TEXT_POOL * recall_k} (value_text_strict: top-{recall_k})")
    out.info = {"kind": "ivfpq", "n": n, "d": d, "nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe,
                "rerank": rerank, "train_size": int(n_train), "bytes_per_vector": m * nbits // 8, "recall": recall}
    out.info["build_s"] = round(time.time() - t0, 3)
    return out
