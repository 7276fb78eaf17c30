"""Embedding engine and cache: exactness vs open_clip, views, reuse (SIGKILL: test_faults)."""


import numpy as np
import pytest
import torch
from PIL import Image
from shardgen import jpeg_bytes, write_good_shards

from mmia.cache import EmbeddingCache, FeatureStore, pair_digests
from mmia.embed import Encoder, decode_image, embed_shards
from mmia.views import AugmentConfig, make_view


def cache_contents(cache: EmbeddingCache, views) -> dict:
    """digest → features for every store: the cache as a mapping, for equality checks.
    `views` [0, 1, …, K]: view 0's image features, and the pairs' K view cosines."""
    stores = {"text": cache.text, 0: cache.image(0)}
    if max(views) >= 1:
        stores["pairs"] = cache.pairs(max(views))
    out = {}
    for name, store in stores.items():
        store.refresh()
        keys = sorted(store.digests())
        out[name] = (keys, store.read(keys).tobytes() if keys else b"")
    return out


def test_cached_features_equal_direct_open_clip(tmp_path, tiny_model):
    pattern = write_good_shards(tmp_path, 2, 5)
    result = embed_shards(tiny_model, [pattern], str(tmp_path / "c"), batch_size=4,
                          workers=0, progress=False)
    assert result.embedded == 10 and result.cached == 0 and not result.skips
    cache = EmbeddingCache(str(tmp_path / "c"), tiny_model.fingerprint)
    recs = result.records
    image = cache.read_image([r.image_digest for r in recs], [0])[:, 0]
    text = cache.read_text([r.caption_digest for r in recs])
    model = tiny_model.model
    with torch.no_grad():
        x = torch.stack([tiny_model.preprocess(decode_image(jpeg_bytes(i)))
                         for i in [0, 1, 2, 3, 4, 1000, 1001, 1002, 1003, 1004]])
        direct_img = model.encode_image(x, normalize=True).numpy()
        direct_txt = model.encode_text(tiny_model.tokenizer([r.caption for r in recs]),
                                       normalize=True).numpy()
    assert np.abs(image - direct_img).max() <= 1e-5
    assert np.abs(text - direct_txt).max() <= 1e-5
    assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=1e-5)
    assert image.dtype == np.float32


def test_a_cache_opened_before_embedding_reads_what_was_embedded_since(tmp_path, tiny_model):
    cache = EmbeddingCache(str(tmp_path / "c"), tiny_model.fingerprint)
    pattern = write_good_shards(tmp_path, 1, 3)
    result = embed_shards(tiny_model, [pattern], str(tmp_path / "c"), views=1, batch_size=4,
                          workers=0, progress=False)
    assert cache.read_text([r.caption_digest for r in result.records]).shape == (3, 32)
    table = result.records
    assert cache.read_image(table.image_digest, [0]).shape == (3, 1, 32)
    assert cache.pairs(1).read(pair_digests(table.image_digest, table.caption_digest)).shape \
        == (3, 1)
    with pytest.raises(KeyError):
        cache.read_text(["0" * 32])


def test_pair_cosines_are_the_views_features_times_the_caption_features(tmp_path, tiny_model):
    """AEA's cached input: cos(view k, caption) for k = 1..K, equal to what the kept view
    features give; without --keep-view-features the views' features are not stored."""
    pattern = write_good_shards(tmp_path, 1, 4)
    kept = embed_shards(tiny_model, [pattern], str(tmp_path / "k"), views=3, batch_size=4,
                        workers=0, progress=False, keep_view_features=True)
    plain = embed_shards(tiny_model, [pattern], str(tmp_path / "p"), views=3, batch_size=4,
                         workers=0, progress=False)
    t = kept.records
    pairs = pair_digests(t.image_digest, t.caption_digest)
    k_cache = EmbeddingCache(str(tmp_path / "k"), tiny_model.fingerprint)
    p_cache = EmbeddingCache(str(tmp_path / "p"), tiny_model.fingerprint)
    views = k_cache.read_image(t.image_digest, [1, 2, 3])
    text = k_cache.read_text(t.caption_digest)
    expected = np.einsum("nkd,nd->nk", views, text)
    assert np.abs(k_cache.pairs(3).read(pairs) - expected).max() < 1e-5
    assert np.array_equal(p_cache.pairs(3).read(pairs), k_cache.pairs(3).read(pairs))
    assert len(plain.records) == 4 and p_cache.image(1).digests() == set()
    assert len(k_cache.image(2).digests()) == 4


def test_second_run_makes_no_forward_pass(tmp_path, tiny_model):
    pattern = write_good_shards(tmp_path, 2, 3)
    first = embed_shards(tiny_model, [pattern], str(tmp_path / "c"), views=2, batch_size=4,
                         workers=1, progress=False)
    assert first.forward_passes > 0 and first.embedded == 6
    second = embed_shards(tiny_model, [pattern], str(tmp_path / "c"), views=2, batch_size=4,
                          workers=1, progress=False)
    assert second.forward_passes == 0 and second.cached == 6 and second.embedded == 0
    assert "no forward pass" in second.summary()


def test_padded_batches_make_features_independent_of_batch_mates(tiny_model):
    enc = Encoder(tiny_model, batch_size=8)
    rng = torch.Generator().manual_seed(0)
    xs = torch.randn(12, 3, 32, 32, generator=rng)
    alone = enc.images([xs[0]])
    mixed = enc.images([xs[5], xs[0], xs[7]])
    assert alone[0].tobytes() == mixed[1].tobytes()


def test_views_are_deterministic_and_distinct(tiny_model):
    image = decode_image(jpeg_bytes(7, size=48))
    cfg = AugmentConfig()
    a = make_view(image, "d" * 32, 3, tiny_model.preprocess, cfg)
    b = make_view(image, "d" * 32, 3, tiny_model.preprocess, cfg)
    c = make_view(image, "d" * 32, 4, tiny_model.preprocess, cfg)
    d = make_view(image, "d" * 32, 3, tiny_model.preprocess, AugmentConfig(jitter=0.1))
    plain = make_view(image, "d" * 32, 0, tiny_model.preprocess, cfg)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert torch.equal(plain, tiny_model.preprocess(image))


def test_augment_config_change_uses_another_store(tmp_path, tiny_model):
    one = EmbeddingCache(str(tmp_path), tiny_model.fingerprint, AugmentConfig())
    two = EmbeddingCache(str(tmp_path), tiny_model.fingerprint, AugmentConfig(jitter=0.1))
    assert one.view_folder(0) == two.view_folder(0)
    assert one.view_folder(1) != two.view_folder(1)


def test_fingerprints_never_share_features(tmp_path):
    a = EmbeddingCache(str(tmp_path), "fp-a")
    a.text.write(["x" * 32], np.ones((1, 4), np.float32))
    b = EmbeddingCache(str(tmp_path), "fp-b")
    assert not b.text.contains(["x" * 32])[0]
    with pytest.raises(KeyError):
        b.read_text(["x" * 32])


def test_uncommitted_segment_is_invisible(tmp_path):
    store = FeatureStore(str(tmp_path)).refresh()
    store.write(["a" * 32], np.ones((1, 3), np.float32))
    np.save(tmp_path / "99999999-dead.feat.npy", np.zeros((1, 3), np.float32))  # torn write
    store2 = FeatureStore(str(tmp_path)).refresh()
    assert store2.digests() == {"a" * 32}


def test_decompression_bomb_is_refused():
    import io

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    with pytest.raises(Image.DecompressionBombError):
        decode_image(buf.getvalue())


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_workers_start_under_spawn_and_forkserver(tmp_path, tiny_model, start_method):
    """macOS starts workers with spawn and Python 3.14 with forkserver: everything the
    worker gets (stream, preprocessing, collate function) must pickle."""
    pattern = write_good_shards(tmp_path, 1, 3)
    result = embed_shards(tiny_model, [pattern], str(tmp_path / "c"), views=1, batch_size=4,
                          workers=1, progress=False, mp_context=start_method)
    assert result.embedded == 3 and not result.skips


def test_progress_callback_sees_every_sample(tmp_path, tiny_model, capsys):
    pattern = write_good_shards(tmp_path, 2, 3)
    calls = []
    embed_shards(tiny_model, [pattern], str(tmp_path / "c"), batch_size=4, workers=0,
                 progress=lambda done, counts: calls.append((done, dict(counts))))
    assert sum(done for done, _ in calls) == 6 and calls[-1][1]["new"] == 6
    assert capsys.readouterr().err == ""  # a callback replaces the bar: nothing printed


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    import io

    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 30000], [65535, 1000]], dtype=np.uint16)).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    decoded = np.asarray(decode_image(buf.getvalue()))
    assert decoded.shape == (2, 2, 3)
    # v * 255 / 65535, rounded: 0, 117, 255, 4 (PIL's own convert gives 0, 255, 255, 255)
    assert decoded[..., 0].tolist() == [[0, 117], [255, 4]]
