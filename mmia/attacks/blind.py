"""Blind baseline (Das, Zhang, Tramer 2024): a model-free member classifier.

TF-IDF word 1-2 grams of captions plus simple image statistics feed a logistic regression,
cross-validated on the evaluation set itself. It never queries the target model, so a high AUC
measures distribution shift between members and non-members, not leakage.

`cross_val_scores` scales to 10^6 captions: captions are tokenised once, in Arrow (no Python
per caption), into a sparse count matrix; each fold then fits the TF-IDF weights, the scaler
and the regression on its own training rows (at most `max_fit_rows` of them, a stratified
subsample) and scores every held-out row, so each sample is scored by one model that never saw
it. The result is the same model as `make_pipeline` (TfidfVectorizer word 1-2 grams, sublinear
tf, smooth idf, L2 rows; StandardScaler; class-balanced LogisticRegression), up to word
boundaries outside ASCII (Arrow's Unicode letter/digit classes and lowercasing stand in for
Python's).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from mmia.attacks.base import Attack, Features, MissingInput
from mmia.metrics import check_labels

N_IMAGE_STATS = 10
STATS_SIZE = 64  # statistics are taken on a thumbnail at most this wide and high
TOKEN_PATTERN = r"(?u)\b\w+\b"  # the pipeline's; `caption_counts` splits on its complement
NON_WORD = r"[^\pL\pN_]+"
MAX_FIT_ROWS = 50_000  # training rows per fold; more cost time and change the AUC little
CAPPED_MIN_DF = 2  # a capped fold's regression ignores terms in fewer of its training rows
SCORE_CHUNK = 65_536  # held-out rows transformed and scored at a time
CAPTION_CHUNK = 131_072  # captions tokenised at a time (bounds Arrow's intermediates)


def image_stats_of(image, n_bytes: int, width: int, height: int) -> np.ndarray:
    """[mean R,G,B, std R,G,B, log width, log height, log byte size, decode_failed] of a decoded
    image (float32), as `image_stats` computes them from the encoded bytes; `image` (a PIL
    image, converted to RGB if it is not) is left unchanged, `width` and `height` are the
    encoded image's size."""
    im = image.convert("RGB") if image.mode != "RGB" else image.copy()
    im.thumbnail((STATS_SIZE, STATS_SIZE))
    pixels = np.asarray(im, dtype=np.float64).reshape(-1, 3) / 255.0
    out = np.zeros(N_IMAGE_STATS, dtype=np.float64)
    out[0:3] = pixels.mean(axis=0)
    out[3:6] = pixels.std(axis=0)
    out[6], out[7], out[8] = np.log1p(width), np.log1p(height), np.log1p(n_bytes)
    return out.astype(np.float32)


def image_stats(data: bytes | None) -> np.ndarray:
    """`image_stats_of` from the encoded bytes; an empty or undecodable image gets only its
    log byte size and decode_failed = 1."""
    out = np.zeros(N_IMAGE_STATS, dtype=np.float32)
    if not data:
        out[-1] = 1.0
        return out
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            rgb = im.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable image is just a feature value
        out[8], out[-1] = np.log1p(len(data)), 1.0
        return out
    return image_stats_of(rgb, len(data), width, height)


def image_matrix(features: Features) -> np.ndarray | None:
    """(n, N_IMAGE_STATS) float32 image statistics: `features.image_stats` if given, else
    computed from `features.image_bytes`; None when there are neither."""
    if features.image_stats is not None:
        return np.asarray(features.image_stats, dtype=np.float32)
    if features.image_bytes is None:
        return None
    return np.stack([image_stats(b) for b in features.image_bytes]).reshape(-1, N_IMAGE_STATS)


def blind_design(features: Features, use_images: bool = True) -> np.ndarray:
    """(n, 1 [+ N_IMAGE_STATS]) object array for `Blind.make_pipeline`: the caption, then the
    image statistics (for small sets: an object array costs ~100 bytes a cell)."""
    captions = np.asarray(list(features.captions), dtype=object)[:, None]
    image = image_matrix(features) if use_images else None
    if image is None:
        return captions
    return np.concatenate([captions, image.astype(np.float64).astype(object)], axis=1)


def caption_counts(captions: list[str] | pa.Array) -> sp.csr_matrix:
    """(n, V + V^2) float32 counts of each caption's lowercased word unigrams and bigrams
    (TfidfVectorizer's analyzer with ngram_range=(1, 2) and TOKEN_PATTERN), tokenised in Arrow
    (`captions` may be an Arrow string array). Column w is the w-th of the V distinct words,
    V + V*w1 + w2 the bigram (w1, w2): sparse term codes, never compacted (no sort of every
    bigram); `_FoldDesign` compacts those of its own training rows."""
    if not isinstance(captions, pa.Array):
        captions = pa.array(captions, type=pa.large_string())
    starts = range(0, len(captions), CAPTION_CHUNK)
    parts = [_word_codes(captions.slice(s, CAPTION_CHUNK)) for s in starts]
    if not parts:
        return sp.csr_matrix((0, 0), dtype=np.float32)
    coded = pa.chunked_array([words for _, words in parts]).unify_dictionaries()
    n_words = len(coded.chunk(0).dictionary)
    blocks = [_term_counts(rows, words.indices.to_numpy(), min(CAPTION_CHUNK, len(captions) - s),
                           n_words)
              for s, (rows, _), words in zip(starts, parts, coded.chunks, strict=True)]
    return sp.vstack(blocks, format="csr")


def _ascii_word_bytes() -> np.ndarray:
    """Byte map of ASCII text: letters lowercased, digits and "_" kept (the word characters),
    every other byte a space."""
    table = np.full(256, ord(" "), np.uint8)
    for chars in (b"abcdefghijklmnopqrstuvwxyz", b"0123456789_"):
        table[np.frombuffer(chars, np.uint8)] = np.frombuffer(chars, np.uint8)
    upper = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
    table[upper] = upper + 32
    return table


ASCII_WORD_BYTES = _ascii_word_bytes()


def _ascii_words(captions: pa.Array) -> pa.Array | None:
    """The captions lowercased with every non-word character a space, mapped byte by byte in
    numpy, when all of them are ASCII and none is null (else None: the regex path)."""
    if captions.null_count or not pa.types.is_large_string(captions.type):
        return None
    offsets = np.frombuffer(captions.buffers()[1], np.int64)[
        captions.offset: captions.offset + len(captions) + 1]
    if not len(offsets):
        return None
    data = np.frombuffer(captions.buffers()[2] or b"", np.uint8)[offsets[0]:offsets[-1]]
    if data.size and data.max() >= 128:
        return None
    return pa.Array.from_buffers(pa.large_string(), len(captions), [
        None, pa.py_buffer(offsets - offsets[0]), pa.py_buffer(ASCII_WORD_BYTES[data])])


def _word_codes(captions: pa.Array) -> tuple[np.ndarray, pa.DictionaryArray]:
    """(caption row, word) of every word in caption order, the words dictionary-encoded:
    TOKEN_PATTERN's words of the lowercased captions, split in Arrow (ASCII captions: split on
    spaces after a byte map, which gives the same words without a regex)."""
    ascii_words = _ascii_words(captions)
    if ascii_words is not None:
        lists = pc.split_pattern(ascii_words, " ")
    else:
        lists = pc.split_pattern_regex(pc.utf8_lower(captions), NON_WORD)
    words = pc.list_flatten(lists)
    nonempty = pc.greater(pc.utf8_length(words), 0)
    rows = pc.list_parent_indices(lists).filter(nonempty).to_numpy().astype(np.int32)
    return rows, pc.dictionary_encode(words.filter(nonempty))


def _term_counts(rows: np.ndarray, tokens: np.ndarray, n_rows: int,
                 n_words: int) -> sp.csr_matrix:
    """The unigram and bigram count rows of one chunk of captions (see `caption_counts`)."""
    follows = np.flatnonzero(rows[1:] == rows[:-1])  # bigram (tokens[i], tokens[i + 1])
    bigrams = tokens[follows].astype(np.int64) * n_words + tokens[follows + 1] + n_words
    matrix = _rows_to_csr(n_rows, (rows, tokens), (rows[follows], bigrams),
                          n_cols=n_words + n_words * n_words)
    matrix.sum_duplicates()
    return matrix


def _rows_to_csr(n_rows: int, *parts: tuple[np.ndarray, np.ndarray], n_cols: int) -> sp.csr_matrix:
    """A CSR matrix of ones from parts of (row, column) entries, each part's rows ascending:
    row r holds part 0's entries of r, then part 1's, ... (duplicates not yet summed)."""
    lengths = [np.bincount(rows, minlength=n_rows) for rows, _ in parts]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.sum(lengths, axis=0), out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=np.int32 if n_cols < 2**31 else np.int64)
    offset = indptr[:-1].copy()
    for (rows, cols), length in zip(parts, lengths, strict=True):
        first = np.cumsum(length) - length  # index in this part of each row's first entry
        at = offset[rows]
        at += np.arange(len(rows))
        at -= first[rows]
        indices[at] = cols
        del at
        offset += length
    data = np.ones(len(indices), dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))


def grouped_folds(y: np.ndarray, groups: list[str], k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of each sample: every group (content digest) in one fold, each fold
    holding about 1/k of each class. Groups are shuffled within their (majority) class and
    dealt out by cumulative size: O(n), unlike StratifiedGroupKFold's per-group search."""
    codes = pc.dictionary_encode(pa.array(list(groups), type=pa.large_string()))
    gid = codes.indices.to_numpy().astype(np.int64)
    size = np.bincount(gid)
    label = (2 * np.bincount(gid, weights=y, minlength=len(size)) >= size).astype(np.int64)
    rng = np.random.default_rng(seed)
    fold_of_group = np.empty(len(size), dtype=np.int64)
    for cls in (0, 1):
        order = rng.permutation(np.flatnonzero(label == cls))
        before = np.cumsum(size[order]) - size[order]
        fold_of_group[order] = before * k // max(1, int(size[order].sum()))
    return fold_of_group[gid]


def _stratified_cap(rows: np.ndarray, y: np.ndarray, cap: int,
                    rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of `rows`, sorted, each class keeping its share."""
    if len(rows) <= cap:
        return rows
    picked = []
    for cls in (0, 1):
        members = rows[y[rows] == cls]
        take = int(round(cap * len(members) / len(rows)))
        picked.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(picked))


class _FoldDesign:
    """TF-IDF weights and image scaling learnt from one fold's training rows; transforms any
    rows of the count matrix into the regression's design. Terms in fewer than `min_df`
    training rows are dropped (with min_df = 1, the terms unseen in training, as
    TfidfVectorizer drops them)."""

    def __init__(self, counts: sp.csr_matrix, image: np.ndarray | None, min_df: int = 1) -> None:
        terms, df = np.unique(counts.indices, return_counts=True)
        kept = df >= min_df
        self.terms = terms[kept]  # ascending term codes: a term's column is its position
        self.idf = np.log((1.0 + counts.shape[0]) / (1.0 + df[kept])) + 1.0
        self.scaler = None if image is None else StandardScaler().fit(image.astype(np.float64))

    def _columns(self, codes: np.ndarray) -> np.ndarray:
        """Each term code's column, or -1 where the term is not in the design."""
        if self.terms.size == 0:
            return np.full(codes.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.terms, codes), self.terms.size - 1)
        return np.where(self.terms[pos] == codes, pos, -1)

    def transform(self, counts: sp.csr_matrix, image: np.ndarray | None) -> sp.csr_matrix:
        """Sublinear tf x idf, L2-normalised rows, then the standardised image columns."""
        column = self._columns(counts.indices)
        keep = column >= 0
        n_rows = counts.shape[0]
        row = np.repeat(np.arange(n_rows), np.diff(counts.indptr))[keep]
        data = (1.0 + np.log(counts.data[keep].astype(np.float64))) * self.idf[column[keep]]
        norms = np.sqrt(np.bincount(row, weights=data * data, minlength=n_rows))
        data /= norms[row]
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=n_rows), out=indptr[1:])
        text = sp.csr_matrix((data, column[keep], indptr), shape=(n_rows, self.terms.size))
        if image is None:
            return text
        scaled = self.scaler.transform(image.astype(np.float64))
        return sp.hstack([text, sp.csr_matrix(scaled)], format="csr")


class Blind(Attack):
    """Captions + image statistics -> logistic regression; scored out-of-fold.

    One scikit-learn `Pipeline` (`make_pipeline`): TF-IDF of caption word 1-2 grams beside
    standardised image statistics, then a class-balanced logistic regression.
    `cross_val_scores` fits the same model fold by fold on a sparse design built once.
    """

    name = "blind"
    requires = ("labels",)

    def __init__(self, n_splits: int = 5, C: float = 1.0, use_images: bool = True,
                 max_fit_rows: int = MAX_FIT_ROWS) -> None:
        self.n_splits = n_splits
        self.C = C
        self.use_images = use_images
        self.max_fit_rows = max_fit_rows

    def make_classifier(self) -> LogisticRegression:
        """Class-balanced L2 logistic regression. Newton-CG: a few Newton steps reach the
        optimum that L-BFGS approaches in hundreds of iterations on 10^4-10^5 sparse terms."""
        return LogisticRegression(C=self.C, max_iter=2000, class_weight="balanced",
                                  solver="newton-cg")

    def make_pipeline(self, n_columns: int) -> Pipeline:
        """The unfitted model for a design matrix of `n_columns` (see `blind_design`)."""
        parts = [("caption", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                                             token_pattern=TOKEN_PATTERN), 0)]
        if n_columns > 1:
            parts.append(("image", StandardScaler(), list(range(1, n_columns))))
        return Pipeline([("features", ColumnTransformer(parts)),
                         ("classifier", self.make_classifier())])

    def fit(self, known_nonmembers: Features | None = None, pool: Features | None = None) -> Blind:
        raise MissingInput(
            "the blind baseline is supervised on the evaluation labels: use "
            "cross_val_scores(features, labels, seed) or fit_labeled(features, labels)"
        )

    def fit_labeled(self, features: Features, labels: np.ndarray) -> Blind:
        """Fit on labelled samples (for scoring a different, held-out set)."""
        y = check_labels(labels)
        x = blind_design(features, self.use_images)
        self.model_ = self.make_pipeline(x.shape[1]).fit(x, y)
        return self

    def score(self, features: Features) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self.model_.predict_proba(blind_design(features, self.use_images))[:, 1]

    def cross_val_scores(self, features: Features, labels: np.ndarray, seed: int = 0) -> np.ndarray:
        """Out-of-fold member probabilities from stratified k-fold on the evaluation set, grouped
        by `features.groups` (content digests) when given: each sample is scored by the one
        model fitted without its fold."""
        y = check_labels(labels)
        if len(y) != len(features):
            raise ValueError("labels and features differ in length")
        k = min(self.n_splits, int(np.bincount(y).min()))
        if k < 2:
            raise MissingInput(
                "the blind baseline needs at least 2 members and 2 non-members to "
                f"cross-validate (got {int(y.sum())} and {int((y == 0).sum())})")
        counts = caption_counts(features.captions)
        image = image_matrix(features) if self.use_images else None
        fold = self._folds(y, features.groups, k, seed)
        rng = np.random.default_rng(seed)
        out = np.empty(len(y), dtype=np.float64)
        for f in range(k):
            train = np.flatnonzero(fold != f)
            min_df = 1 if len(train) <= self.max_fit_rows else CAPPED_MIN_DF
            train = _stratified_cap(train, y, self.max_fit_rows, rng)
            design = _FoldDesign(counts[train], None if image is None else image[train], min_df)
            model = self.make_classifier().fit(
                design.transform(counts[train], None if image is None else image[train]),
                y[train])
            held_out = np.flatnonzero(fold == f)
            for start in range(0, len(held_out), SCORE_CHUNK):
                rows = held_out[start:start + SCORE_CHUNK]
                x = design.transform(counts[rows], None if image is None else image[rows])
                out[rows] = model.predict_proba(x)[:, 1]
        return out

    @staticmethod
    def _folds(y: np.ndarray, groups: list[str] | None, k: int, seed: int) -> np.ndarray:
        """Each sample's fold: StratifiedKFold without groups, `grouped_folds` with them."""
        if groups is not None:
            return grouped_folds(y, groups, k, seed)
        fold = np.empty(len(y), dtype=np.int64)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for f, (_, test) in enumerate(splitter.split(np.zeros((len(y), 1)), y)):
            fold[test] = f
        return fold
