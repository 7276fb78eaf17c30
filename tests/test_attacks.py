"""Attacks on constructed embeddings where the correct ranking is known."""

import io

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mmia.attacks import AEA, ATTACKS, CSA, WSA, Blind, Features, MissingInput, make_attack

D = 32


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _pairs_with_cos(cos, rng):
    """Image/text unit vectors with exactly the given row-wise cosines."""
    cos = np.asarray(cos, float)
    u = _unit(rng.normal(size=(len(cos), D)))
    v = rng.normal(size=(len(cos), D))
    v = _unit(v - np.sum(v * u, axis=1, keepdims=True) * u)
    return u, _unit(cos[:, None] * u + np.sqrt(1 - cos[:, None] ** 2) * v)


def _feats(img, txt, views=None, captions=None, image_bytes=None, prefix="k"):
    keys = [f"{prefix}{i}" for i in range(len(img))]
    return Features(
        keys=keys, image=img, text=txt, views=views, captions=captions, image_bytes=image_bytes
    )


def _members_vs_random(n, rng, offset=0.0):
    """Members: text close to image (and optionally shifted along e0); non-members random."""
    shift = np.zeros(D)
    shift[0] = offset
    mi = _unit(rng.normal(size=(n, D)) / np.sqrt(D) + shift)
    mt = _unit(mi + 0.05 * rng.normal(size=(n, D)))
    ni, nt = _unit(rng.normal(size=(n, D))), _unit(rng.normal(size=(n, D)))
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    return _feats(np.r_[mi, ni], np.r_[mt, nt]), labels


def test_registry_and_missing_inputs():
    assert set(ATTACKS) == {"csa", "aea", "wsa", "blind", "rcsa", "mcd", "loss", "grad"}
    assert isinstance(make_attack("aea", aggregation="drop"), AEA)
    with pytest.raises(ValueError):
        make_attack("nope")
    with pytest.raises(ValueError):
        AEA(aggregation="median")
    f, _ = _members_vs_random(5, np.random.default_rng(0))
    with pytest.raises(MissingInput):
        AEA().score(f)
    with pytest.raises(MissingInput):
        WSA().fit(None, f)
    with pytest.raises(MissingInput):
        WSA().fit(f, None)
    assert issubclass(MissingInput, ValueError)
    assert "views" in AEA.requires and "pool" in WSA.requires


def test_features_subset():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(6, D))), _unit(rng.normal(size=(6, D)))
    views = np.stack([img, img], axis=1)
    f = _feats(img, txt, views, [f"c{i}" for i in range(6)], [bytes([i]) for i in range(6)])
    s = f.subset([4, 1])
    assert s.keys == ["k4", "k1"] and s.captions == ["c4", "c1"] and s.image_bytes == [b"\4", b"\1"]
    np.testing.assert_array_equal(s.views[0], views[4])
    assert len(f.subset(np.arange(6) % 2 == 0)) == 3
    with pytest.raises(ValueError):
        Features(keys=["a"], image=img, text=txt)


def test_csa_is_cosine_and_ranks_members_first():
    rng = np.random.default_rng(0)
    img, txt = _pairs_with_cos([0.9, -0.2, 0.3], rng)
    np.testing.assert_allclose(CSA().fit().score(_feats(img, txt)), [0.9, -0.2, 0.3], atol=1e-5)
    f, y = _members_vs_random(100, rng)
    assert roc_auc_score(y, CSA().score(f)) > 0.99


def test_aea_aggregations():
    rng = np.random.default_rng(0)
    n, k = 100, 4
    mi, mt = _pairs_with_cos(np.full(n, 0.9), rng)
    ni, nt = _pairs_with_cos(np.full(n, 0.3), rng)
    img, txt = np.r_[mi, ni], np.r_[mt, nt]
    # members' views lose similarity (0.9 -> ~0.5); non-members' views barely change
    noise = rng.normal(size=(2 * n, k, D))
    scale = np.r_[np.full(n, 0.6), np.full(n, 0.05)][:, None, None]
    views = _unit(img[:, None, :] + scale * noise)
    f = _feats(img, txt, views)
    y = np.r_[np.ones(n), np.zeros(n)]
    base = CSA().score(f)
    per_view = np.einsum("nkd,nd->nk", views, txt)
    scores = {a: AEA(aggregation=a).score(f) for a in ("mean", "mean_all", "min", "drop", "zdrop")}
    np.testing.assert_allclose(scores["mean"], per_view.mean(1), atol=1e-5)
    np.testing.assert_allclose(scores["drop"], base - per_view.mean(1), atol=1e-5)
    np.testing.assert_allclose(scores["mean_all"], (base + per_view.sum(1)) / (k + 1), atol=1e-5)
    np.testing.assert_allclose(scores["min"], np.minimum(base, per_view.min(1)), atol=1e-5)
    np.testing.assert_allclose(scores["zdrop"], (base - per_view.mean(1)) / per_view.std(1),
                               rtol=1e-4)
    assert roc_auc_score(y, scores["drop"]) > 0.95  # the drop is what separates here
    assert roc_auc_score(y, scores["zdrop"]) > 0.95
    assert roc_auc_score(y, scores["mean"]) < 0.35  # members lose more: mean misranks them
    assert all(s.shape == (2 * n,) for s in scores.values())


def test_zdrop_scales_the_drop_by_the_views_spread():
    """Equal drops: the sample whose views agree tightly is the more surprising one."""
    img = np.eye(D)[:2]
    txt = img.copy()  # cos(view 0, text) = 1 for both
    spread = np.array([[0.80, 0.80, 0.80, 0.80], [0.60, 1.00, 0.60, 1.00]])  # mean 0.8 both
    views = np.stack([_views_with_cos(txt[i], spread[i]) for i in range(2)])
    f = _feats(img, txt, views)
    drop, zdrop = AEA("drop").score(f), AEA("zdrop").score(f)
    assert drop[0] == pytest.approx(drop[1], abs=1e-4) == pytest.approx(0.2, abs=1e-4)
    assert zdrop[0] > 1e3 * zdrop[1]  # zero spread: the drop is all signal
    assert zdrop[1] == pytest.approx(0.2 / 0.2, rel=1e-3)


def _views_with_cos(text, cosines):
    """Unit vectors whose cosine with the unit vector `text` is each of `cosines`."""
    rng = np.random.default_rng(1)
    out = []
    for c in cosines:
        v = rng.normal(size=D)
        v = _unit(v - (v @ text) * text)
        out.append(c * text + np.sqrt(1 - c**2) * v)
    return np.array(out)


def test_wsa_pseudo_labels_known_count_and_precision():
    rng = np.random.default_rng(0)
    known = _feats(*_pairs_with_cos(np.tile([-0.1, 0.1], 50), rng))  # mu 0, sigma 0.1
    pool_cos = np.r_[np.full(30, 0.5), np.full(10, 0.2), np.full(60, 0.0)]
    pool = _feats(*_pairs_with_cos(pool_cos, rng))
    pool_labels = np.r_[np.ones(30), np.zeros(70)]
    wsa = WSA(lam=1.5, classifier="logreg").fit(known, pool)
    assert wsa.threshold_ == pytest.approx(0.15, abs=1e-5)
    assert wsa.n_pseudo_members_ == 40
    np.testing.assert_array_equal(wsa.pseudo_member_idx_, np.arange(40))
    assert wsa.pseudo_label_precision(pool_labels) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no pool sample"):
        WSA(lam=1.5).fit(known, _feats(*_pairs_with_cos(np.full(20, -0.5), rng)))


@pytest.mark.parametrize("classifier", ["logreg", "mlp"])
def test_wsa_classifier_learns_members(classifier):
    rng = np.random.default_rng(0)
    pool, pool_y = _members_vs_random(150, rng, offset=1.0)
    known = _feats(_unit(rng.normal(size=(200, D))), _unit(rng.normal(size=(200, D))))
    ev, ev_y = _members_vs_random(100, rng, offset=1.0)
    wsa = WSA(classifier=classifier, seed=0).fit(known, pool)
    assert wsa.pseudo_label_precision(pool_y) > 0.9
    s = wsa.score(ev)
    assert s.shape == (200,) and np.all((s >= 0) & (s <= 1))
    assert roc_auc_score(ev_y, s) > 0.9
    s2 = WSA(classifier=classifier, seed=0).fit(known, pool).score(ev)
    np.testing.assert_allclose(s, s2, atol=1e-6)  # seeded


def _jpeg(color, size):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_blind_detects_caption_shift():
    rng = np.random.default_rng(0)
    words = ["red", "green", "small", "big", "old", "new", "a", "the"]
    n = 40
    caps = [
        " ".join(rng.choice(words, 4)) + (" photo of a dog" if i < n else " image of a cat")
        for i in range(2 * n)
    ]
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    img = _unit(rng.normal(size=(2 * n, D)))
    f = _feats(img, img, captions=caps)
    s = Blind().cross_val_scores(f, y, seed=0)
    assert s.shape == (2 * n,) and not np.isnan(s).any()
    assert roc_auc_score(y, s) > 0.95
    with pytest.raises(MissingInput):
        Blind().fit(None, None)


def test_blind_uses_image_statistics_and_no_shift_is_chance():
    rng = np.random.default_rng(0)
    n = 30
    caps = [" ".join(rng.choice(["a", "b", "c", "d"], 3)) for _ in range(2 * n)]
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    img = _unit(rng.normal(size=(2 * n, D)))
    shifted = [_jpeg((200, 30, 30), (40, 30)) for _ in range(n)]
    shifted += [_jpeg((30, 30, 200), (30, 40)) for _ in range(n)]
    s = Blind().cross_val_scores(_feats(img, img, captions=caps, image_bytes=shifted), y)
    assert roc_auc_score(y, s) > 0.95
    same = [_jpeg((100, 100, 100), (32, 32)) for _ in range(2 * n)]
    s0 = Blind().cross_val_scores(_feats(img, img, captions=caps, image_bytes=same), y)
    assert roc_auc_score(y, s0) < 0.8
    # fit/score on a held-out set also works
    fitted = Blind().fit_labeled(_feats(img, img, captions=caps, image_bytes=shifted), y)
    assert fitted.score(_feats(img, img, captions=caps, image_bytes=shifted)).shape == (2 * n,)


def test_blind_cross_validation_keeps_copies_of_an_image_together():
    """Random labels, each sample present twice: ungrouped folds let a copy's twin teach its
    label (high AUC from nothing); grouped by content, the baseline stays at chance."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    n = 120
    captions = [" ".join(rng.choice(words, 6)) for _ in range(n)]
    labels = rng.permutation(np.r_[np.ones(n // 2), np.zeros(n // 2)]).astype(int)
    twice = np.r_[np.arange(n), np.arange(n)]
    emb = np.zeros((2 * n, 4), np.float32)
    feats = Features(keys=[str(i) for i in range(2 * n)], image=emb, text=emb,
                     captions=[captions[i] for i in twice], groups=[f"d{i}" for i in twice])
    y = labels[twice]
    grouped = roc_auc_score(y, Blind(use_images=False).cross_val_scores(feats, y, seed=0))
    feats.groups = None
    leaky = roc_auc_score(y, Blind(use_images=False).cross_val_scores(feats, y, seed=0))
    assert leaky > 0.8 and abs(grouped - 0.5) < 0.12, (leaky, grouped)


# --- scale: float32 blocked cosine, blocked WSA scoring, image statistics, the blind at scale


def test_cosine_is_float32_blocked_and_matches_float64(monkeypatch):
    import mmia.attacks.base as base

    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(300, 512)), rng.normal(size=(300, 512))
    views = _unit(rng.normal(size=(300, 4, 512)))
    exact = np.sum(img * txt, 1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))
    exact_views = np.einsum("nkd,nd->nk", views.astype(np.float64), _unit(txt).astype(float))
    got, got_views = base.cosine(img, txt), base.cosine(views, _unit(txt)[:, None, :])
    assert got.dtype == np.float32 and got_views.dtype == np.float32
    assert got_views.shape == (300, 4)
    np.testing.assert_allclose(got, exact, atol=1e-6)
    np.testing.assert_allclose(got_views, exact_views, atol=1e-6)
    monkeypatch.setattr(base, "COSINE_BLOCK_BYTES", 5000)  # a few rows a block
    np.testing.assert_array_equal(base.cosine(views, _unit(txt)[:, None, :]), got_views)
    np.testing.assert_allclose(base.cosine(img, txt), exact, atol=1e-6)


@pytest.mark.parametrize("classifier", ["logreg", "mlp"])
def test_wsa_scores_in_blocks_equal_unblocked_predict_proba(classifier, monkeypatch):
    import mmia.attacks.wsa as wsa_module

    rng = np.random.default_rng(0)
    pool, _ = _members_vs_random(150, rng, offset=1.0)
    known = _feats(_unit(rng.normal(size=(200, D))), _unit(rng.normal(size=(200, D))))
    ev, _ = _members_vs_random(50, rng, offset=1.0)
    wsa = WSA(classifier=classifier, seed=0).fit(known, pool)
    full = wsa.model_.predict_proba(np.concatenate([ev.image, ev.text], 1).astype(float))[:, 1]
    monkeypatch.setattr(wsa_module, "SCORE_BLOCK", 7)  # 100 rows in 15 blocks
    blocked = wsa.score(ev)
    assert blocked.dtype == np.float64
    np.testing.assert_allclose(blocked, full, atol=1e-5, rtol=1e-5)


def _encoded(image, fmt):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_image_stats_of_a_decoded_image_equals_image_stats_of_its_bytes():
    from PIL import Image

    from mmia.attacks.blind import N_IMAGE_STATS, image_stats, image_stats_of

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(150, 220, 3), dtype=np.uint8)
    images = [_encoded(Image.fromarray(noise), "JPEG"),
              _encoded(Image.fromarray(noise).convert("RGBA"), "PNG"),
              _encoded(Image.fromarray(noise).convert("P"), "PNG"),
              _encoded(Image.fromarray(noise[:40, :30, 0]), "PNG"),  # grayscale, small
              _jpeg((10, 200, 30), (64, 300))]
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            rgb = im.convert("RGB")
        before = np.asarray(rgb).copy()
        stats = image_stats_of(rgb, len(data), width, height)
        assert stats.dtype == np.float32 and stats.shape == (N_IMAGE_STATS,)
        np.testing.assert_array_equal(stats, image_stats(data))
        np.testing.assert_array_equal(np.asarray(rgb), before)  # the caller's image untouched
    assert image_stats(b"")[-1] == 1 and image_stats(b"not an image")[-1] == 1
    assert image_stats(b"not an image")[8] == pytest.approx(np.log1p(12))


def test_blind_prefers_the_image_stats_field_and_subset_carries_it():
    rng = np.random.default_rng(0)
    n = 60
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    stats = rng.normal(size=(n, 10)).astype(np.float32)
    stats[:, 0] += 3.0 * y  # mean red differs: a pure image shift
    emb = np.zeros((n, 0), np.float32)
    caps = [" ".join(rng.choice(["a", "b", "c", "d"], 3)) for _ in range(n)]
    f = Features(keys=[str(i) for i in range(n)], image=emb, text=emb, captions=caps,
                 image_stats=stats, image_bytes=[b""] * n)  # the bytes would say nothing
    assert roc_auc_score(y, Blind().cross_val_scores(f, y)) > 0.95
    np.testing.assert_array_equal(f.subset([3, 1]).image_stats, stats[[3, 1]])
    with pytest.raises(ValueError):
        Features(keys=["a"], image=emb[:1], text=emb[:1], image_stats=stats)


def _word_captions(n, rng, label_word=None, y=None):
    words = [f"w{i}" for i in range(50)]
    caps = [" ".join(rng.choice(words, 6)) for _ in range(n)]
    if label_word:
        caps = [c + (" alpha" if lab else " beta") for c, lab in zip(caps, y, strict=True)]
    return caps


@pytest.mark.parametrize("max_fit_rows", [10_000, 150])  # 150: each fold fits a capped sample
def test_blind_scores_every_sample_out_of_fold(max_fit_rows):
    rng = np.random.default_rng(1)
    n = 400
    y = rng.permutation(np.r_[np.ones(n // 2), np.zeros(n // 2)]).astype(int)
    emb = np.zeros((n, 0), np.float32)
    groups = [f"d{i}" for i in range(n)]

    def auc(caps):
        f = Features(keys=groups, image=emb, text=emb, captions=caps, groups=groups)
        s = Blind(use_images=False, max_fit_rows=max_fit_rows).cross_val_scores(f, y, seed=0)
        assert s.shape == (n,) and np.isfinite(s).all()
        return roc_auc_score(y, s)

    assert auc(_word_captions(n, rng, "alpha", y)) > 0.99  # one word gives the label away
    assert abs(auc(_word_captions(n, rng)) - 0.5) < 0.1  # random captions: chance
    # a caption word unique to each sample: in-sample it would name the label (AUC 1);
    # out of fold it is a word no model has seen
    assert abs(auc([f"u{i} common" for i in range(n)]) - 0.5) < 0.1


def test_blind_cross_validation_equals_the_pipeline_fitted_fold_by_fold():
    """The sparse per-fold design is the same model as `make_pipeline` (TF-IDF word 1-2 grams
    beside scaled image statistics, then the regression) fitted on each fold's training rows."""
    from mmia.attacks.blind import blind_design

    rng = np.random.default_rng(0)
    n = 200
    words = ["red", "Green", "small", "big", "old", "café", "x_y", "3d", "a", "the"]
    caps = [" ".join(rng.choice(words, rng.integers(0, 7))) + ("!" if i % 3 else ", dog.")
            for i in range(n)]
    y = (rng.random(n) < 0.4).astype(int)
    stats = rng.normal(size=(n, 10)).astype(np.float32) + y[:, None] * 0.3
    emb = np.zeros((n, 0), np.float32)
    groups = [f"g{i // 2}" for i in range(n)]
    f = Features(keys=groups, image=emb, text=emb, captions=caps, groups=groups,
                 image_stats=stats)
    blind = Blind()
    got = blind.cross_val_scores(f, y, seed=3)
    fold, x, want = blind._folds(y, groups, 5, 3), blind_design(f), np.empty(n)
    for k in range(5):
        train, test = fold != k, fold == k
        pipe = blind.make_pipeline(x.shape[1]).fit(x[train], y[train])
        want[test] = pipe.predict_proba(x[test])[:, 1]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_caption_counts_are_countvectorizer_counts():
    from sklearn.feature_extraction.text import CountVectorizer

    from mmia.attacks.blind import TOKEN_PATTERN, caption_counts

    caps = ["Hello, World_x 12 café", "", "  ...  ", "a_b c-d a_b c", "the the the cat",
            "Ünïcode straße ½", "cat the"]
    want = CountVectorizer(ngram_range=(1, 2), token_pattern=TOKEN_PATTERN).fit_transform(caps)
    got = caption_counts(caps)
    assert got.shape[0] == len(caps) and got.nnz == want.nnz
    # equal up to the order of the columns: equal Gram matrices and equal sorted rows
    np.testing.assert_array_equal((got @ got.T).toarray(), (want @ want.T).toarray())
    for i in range(len(caps)):
        assert sorted(got[i].data) == sorted(want[i].data)


def test_ascii_captions_take_the_byte_map_and_give_the_same_counts(monkeypatch):
    """ASCII chunks are split after a byte map, others by the regex: both give CountVectorizer's
    words, whatever the chunking (a chunk of ASCII captions next to one with Unicode)."""
    import pyarrow as pa
    from sklearn.feature_extraction.text import CountVectorizer

    import mmia.attacks.blind as blind

    caps = ["Hello, World_x 12", "", "  ...  ", "A-b\tC\nd", "it's 3.14 x_Y!", "UPPER lower",
            'q"uote; semi:colon', "tab\there", "café Ünï", "straße ½ a_b", "cat", "x"]
    vectorizer = CountVectorizer(ngram_range=(1, 2), token_pattern=blind.TOKEN_PATTERN)
    want = vectorizer.fit_transform(caps)
    ascii_chunks = []
    real = blind._ascii_words
    monkeypatch.setattr(blind, "_ascii_words",
                        lambda c: ascii_chunks.append(real(c) is not None) or real(c))
    for chunk in (3, 4, len(caps)):
        monkeypatch.setattr(blind, "CAPTION_CHUNK", chunk)
        ascii_chunks.clear()
        got = blind.caption_counts(pa.array(caps, pa.large_string()))
        assert got.nnz == want.nnz
        np.testing.assert_array_equal((got @ got.T).toarray(), (want @ want.T).toarray())
        assert ascii_chunks == [False] if chunk == len(caps) else \
            (True in ascii_chunks and False in ascii_chunks)
    assert blind.caption_counts([None, "a"]).shape[0] == 2  # a null caption: the regex path


def test_grouped_folds_keep_groups_together_and_stratify():
    from mmia.attacks.blind import grouped_folds

    rng = np.random.default_rng(0)
    groups = [f"g{i}" for i in rng.integers(0, 3000, size=10_000)]
    first_label = {}
    y = np.array([first_label.setdefault(g, int(rng.random() < 0.3)) for g in groups])
    fold = grouped_folds(y, groups, 5, seed=0)
    fold_of = {}
    for g, f in zip(groups, fold, strict=True):
        assert fold_of.setdefault(g, f) == f  # a group never straddles two folds
    for f in range(5):
        share = np.mean(y[fold == f])
        assert abs(np.mean(fold == f) - 0.2) < 0.02 and abs(share - y.mean()) < 0.03
    assert not np.array_equal(fold, grouped_folds(y, groups, 5, seed=1))


@pytest.mark.parametrize("aggregation", ["mean", "mean_all", "min", "drop", "zdrop"])
def test_aea_on_cached_view_cosines_equals_aea_on_view_features(aggregation):
    """The cache keeps only cos(view k, caption) per pair; AEA on those equals AEA on the
    views' features (what it read before)."""
    rng = np.random.default_rng(3)
    n, k, d = 40, 6, 16
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    img, txt = unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d)))
    views = unit(img[:, None, :] + 0.5 * rng.normal(size=(n, k, d))).astype(np.float32)
    keys = [f"k{i}" for i in range(n)]
    full = Features(keys=keys, image=img, text=txt, views=views)
    cosines = np.einsum("nkd,nd->nk", views, txt).astype(np.float32)
    cached = Features(keys=keys, image=img, text=txt, view_cosines=cosines)
    attack = AEA(aggregation=aggregation)
    assert np.allclose(attack.score(cached), attack.score(full), atol=1e-5)
    with pytest.raises(MissingInput):
        attack.score(Features(keys=keys, image=img, text=txt))
