"""`mmia data`: caption normalisation, each command's counts (hand-computed), presets, bad input,
and the offline end-to-end recipe (sample → dedup → after → pool → download → audit) against a
loopback web server with the real img2dataset."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import stat
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardgen import jpeg_bytes, serve_folder

from mmia.cli import main
from mmia.data import (
    STOPWORDS,
    Engine,
    Source,
    after,
    dedup,
    download,
    normalise_captions,
    pool,
    sample,
)
from mmia.data.dedup import _NLTK_ENGLISH
from mmia.data.download import DownloadSettings, shard_pattern
from mmia.data.metadata import PRESETS
from mmia.errors import MmiaError

ENGINE = Engine(threads=1, memory_limit="512MB")


def rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def write_parquet(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def summary(output) -> dict:
    return json.loads(open(str(output).rstrip("/") + ".summary.json").read())


# --- normalisation -------------------------------------------------------------------------

@pytest.mark.parametrize("caption, expected", [
    ("  The Cat, sat on 2 mats!! ", "cat sat mats"),           # case, stopwords, digits, punct
    ("DON'T stop me now", "stop"),                             # don't → dont: a stopword
    ("The 2 of them!", ""),                                    # nothing left
    ("R2-D2's 3rd film", "rds rd film"),                       # digits and punctuation deleted
    ("black-and-white\tphoto\u00a0of a dog", "blackandwhite photo dog"),  # any white space
    ("Café “au lait” — très bien…", "café au lait très bien"),  # Unicode punctuation
    ("ITEM ١٢٣ item", "item item"),                             # any decimal digit
    (None, None),
])
def test_caption_normalisation_rule(caption, expected):
    assert normalise_captions([caption]) == [expected]


def test_stopwords_are_nltk_english_without_apostrophes():
    assert len(_NLTK_ENGLISH) == 179 and len(set(_NLTK_ENGLISH)) == 179
    assert {"the", "of", "dont", "isnt", "shouldve", "youre", "its"} <= set(STOPWORDS)
    assert not {"photo", "don't", "cat"} & set(STOPWORDS)
    assert all("'" not in w for w in STOPWORDS)


# --- presets and reading -------------------------------------------------------------------

def _preset_file(tmp_path, preset: str) -> str:
    urls, caps = ["http://x/a.jpg", "http://x/b.jpg"], ["first caption", "second caption"]
    pairs = list(zip(urls, caps, strict=True))
    if preset == "laion":
        return write_parquet(tmp_path / "l.parquet", {"URL": urls, "TEXT": caps,
                                                      "similarity": [0.3, 0.4]})
    if preset == "cc3m":
        return write_lines(tmp_path / "c.tsv", [f"{c}\t{u}" for u, c in pairs])
    if preset == "cc12m":
        return write_lines(tmp_path / "c.tsv", [f"{u}\t{c}" for u, c in pairs])
    if preset == "datacomp":
        return write_parquet(tmp_path / "d.parquet", {"uid": ["u1", "u2"], "url": urls,
                                                      "text": caps})
    if preset == "coyo":
        return write_parquet(tmp_path / "c.parquet", {"id": [11, 12], "url": urls, "text": caps})
    if preset == "reddit":
        return write_lines(tmp_path / "r.jsonl", [json.dumps({"id": i, "url": u, "title": c,
                                                              "created_utc": 1650000000})
                                                  for i, (u, c) in zip(["r1", "r2"], pairs,
                                                                           strict=True)])
    return write_parquet(tmp_path / "m.parquet", {"id": ["m1", "m2"], "url": urls,
                                                  "caption": caps, "date": ["2022-01-01", None]})


@pytest.mark.parametrize("preset, ids", [
    ("laion", None), ("cc3m", None), ("cc12m", None), ("datacomp", ["u1", "u2"]),
    ("coyo", ["11", "12"]), ("reddit", ["r1", "r2"]), ("mmia", ["m1", "m2"])])
def test_presets_map_columns(tmp_path, preset, ids):
    path = _preset_file(tmp_path, preset)
    out = tmp_path / "out.parquet"
    sample(Source((path,), PRESETS[preset]), [str(out)], [2], engine=ENGINE)
    got = sorted(rows(out), key=lambda r: r["url"])
    assert [(r["url"], r["caption"]) for r in got] == [("http://x/a.jpg", "first caption"),
                                                       ("http://x/b.jpg", "second caption")]
    if ids is None:  # content ids: md5(url US caption), 16 hex digits
        import hashlib
        ids = [hashlib.md5(f"{r['url']}\x1f{r['caption']}".encode()).hexdigest()[:16]
               for r in got]
    assert [r["id"] for r in got] == ids
    dates = {"reddit": ["1650000000"] * 2, "mmia": ["2022-01-01", None]}.get(preset, [None] * 2)
    assert [r["date"] for r in got] == dates


def test_a_missing_id_becomes_the_content_id(tmp_path):
    import hashlib

    path = write_parquet(tmp_path / "m.parquet", {"id": ["keep", None], "url": ["u1", "u2"],
                                                  "caption": ["a", "b"]})
    sample(Source((path,)), [str(tmp_path / "o.parquet")], [2], engine=ENGINE)
    ids = {x["url"]: x["id"] for x in rows(tmp_path / "o.parquet")}
    assert ids == {"u1": "keep", "u2": hashlib.md5(b"u2\x1fb").hexdigest()[:16]}


# --- sample --------------------------------------------------------------------------------

def _ten_rows(tmp_path) -> str:
    urls = [f"http://h/{i}.jpg" for i in range(8)] + ["", "http://h/0.jpg"]
    caps = [f"caption {chr(97 + i)}" for i in range(8)] + ["no url", "caption a"]  # 9: repeat
    return write_parquet(tmp_path / "ten.parquet", {"url": urls, "caption": caps})


def test_sample_counts_and_disjoint_seeded_slices(tmp_path):
    src = Source((_ten_rows(tmp_path),))
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    r = sample(src, [str(a), str(b)], [3, 5], seed=7, engine=ENGINE)
    assert (r.rows, r.no_url, r.written) == (10, 1, [3, 5])
    ids_a, ids_b = [x["id"] for x in rows(a)], [x["id"] for x in rows(b)]
    assert not set(ids_a) & set(ids_b)
    assert len(set(ids_a + ids_b)) == 8  # the 8 distinct pairs with a URL: all of them
    assert summary(a)["written"] == 3 and summary(b)["written"] == 5 and summary(a)["rows"] == 10
    again = sample(src, [str(tmp_path / "c.parquet")], [3], seed=7, engine=ENGINE)
    assert again.written == [3] and [x["id"] for x in rows(tmp_path / "c.parquet")] == ids_a
    other = sample(src, [str(tmp_path / "d.parquet")], [8], seed=8, engine=ENGINE)
    assert [x["id"] for x in rows(tmp_path / "d.parquet")][:3] != ids_a and other.written == [8]


def test_sample_does_not_depend_on_file_order(tmp_path):
    urls = [f"http://h/{i}.jpg" for i in range(20)]
    caps = [f"caption {chr(97 + i)}" for i in range(20)]
    one = write_parquet(tmp_path / "p1.parquet", {"url": urls[:10], "caption": caps[:10]})
    two = write_parquet(tmp_path / "p2.parquet", {"url": urls[10:], "caption": caps[10:]})
    sample(Source((one, two)), [str(tmp_path / "x.parquet")], [5], seed=3, engine=ENGINE)
    sample(Source((two, one)), [str(tmp_path / "y.parquet")], [5], seed=3, engine=ENGINE)
    assert rows(tmp_path / "x.parquet") == rows(tmp_path / "y.parquet")


def test_sample_too_few_rows_is_one_line(tmp_path):
    with pytest.raises(MmiaError, match=r"only 8 distinct rows with a URL \(of 10\), 9 asked"):
        sample(Source((_ten_rows(tmp_path),)), [str(tmp_path / "a.parquet")], [9],
               engine=ENGINE)


def test_sample_counts_unreadable_tsv_lines(tmp_path):
    tsv = write_lines(tmp_path / "cc.tsv", ["http://h/1.jpg\tone", "no tab here",
                                            "http://h/2.jpg\ttwo", "a\tb\tc"])
    r = sample(Source((tsv,), PRESETS["cc12m"]), [str(tmp_path / "o.parquet")], [2],
               engine=ENGINE)
    assert (r.rows, r.unreadable_lines) == (2, 2)


# --- dedup ---------------------------------------------------------------------------------

def _training(tmp_path) -> str:
    return write_parquet(tmp_path / "train.parquet", {
        "URL": ["http://t/1.jpg", "http://t/2.jpg", "http://t/3.jpg", "http://t/4.jpg"],
        "TEXT": ["A red car on the road", "The blue house", "Green tree in 2019", "In 2019."]})


def test_dedup_counts_by_url_and_by_caption(tmp_path):
    cand = write_parquet(tmp_path / "cand.parquet", {
        "id": ["c1", "c2", "c3", "c4", "c5", "c6", "c7"],
        "url": ["http://t/1.jpg",   # URL in training
                "http://t/2.jpg",   # URL and caption: counts under URL
                "http://c/3.jpg",   # caption only: "red car road"
                "http://c/4.jpg",   # caption only: "green tree"
                "http://c/5.jpg",   # normalises to "" like "In 2019.": matches nothing
                "http://c/6.jpg", "http://c/7.jpg"],
        "caption": ["anything", "the BLUE house!", "RED car, on a road (1999)", "green  tree",
                    "The 2 of them!", "a red bus", "blue houses"]})
    out = tmp_path / "kept.parquet"
    r = dedup(Source((cand,)), Source((_training(tmp_path),), PRESETS["laion"]), str(out),
              ENGINE)
    assert (r.rows, r.dropped_url, r.dropped_caption, r.kept) == (7, 2, 2, 3)
    assert (r.training_rows, r.empty_normalised) == (4, 1)
    assert sorted(x["id"] for x in rows(out)) == ["c5", "c6", "c7"]
    s = summary(out)
    assert (s["dropped_url"], s["dropped_caption"], s["kept"]) == (2, 2, 3)
    assert [e["id"] for e in s["examples"]["url"]] == ["c1", "c2"]
    assert [e["normalised"] for e in s["examples"]["caption"]] == ["red car road", "green tree"]


def test_dedup_training_without_the_mapped_column_is_one_line(tmp_path):
    cand = write_parquet(tmp_path / "cand.parquet", {"url": ["u"], "caption": ["c"]})
    train = write_parquet(tmp_path / "t.parquet", {"url": ["u"], "text": ["c"]})
    with pytest.raises(MmiaError, match=r"has no column 'URL' for the url: its columns are url, "
                                        r"text; pass --url-col or --preset"):
        dedup(Source((cand,)), Source((train,), PRESETS["laion"]),
              str(tmp_path / "o.parquet"), ENGINE)


# --- after ---------------------------------------------------------------------------------

def test_after_counts_dates(tmp_path):
    dates = {
        "k1": "2021-08-21",                  # kept
        "k2": "2021-08-20T23:30:00-02:00",   # 01:30 UTC on the 21st: kept
        "k3": "1629504000",                  # 2021-08-21 00:00:00 UTC: kept
        "n1": "1629503999",                  # 2021-08-20 23:59:59 UTC: the release day
        "n2": "2021-08-20T23:59:59",         # the release day
        "n3": "2019-01-01",
        "m1": "",                            # missing
        "u1": "soon",                        # unreadable
        "u2": "2022",                        # a bare year: unreadable, not epoch 2022 s
    }
    path = write_lines(tmp_path / "d.csv", ["id,url,caption,date"] + [
        f"{i},http://h/{i}.jpg,cap {i},{d}" for i, d in dates.items()] + ["m2,http://h/m2,cap,"])
    out = tmp_path / "after.parquet"
    r = after(Source((path,)), str(out), datetime.date(2021, 8, 20), ENGINE)
    assert (r.rows, r.kept, r.not_after, r.missing_date, r.unreadable_date) == (10, 3, 3, 2, 2)
    assert sorted(x["id"] for x in rows(out)) == ["k1", "k2", "k3"]
    s = summary(out)
    assert (s["no_date"], s["unreadable_examples"]) == (4, ["2022", "soon"])


def test_after_without_a_date_column_is_one_line(tmp_path):
    path = write_parquet(tmp_path / "l.parquet", {"URL": ["u"], "TEXT": ["t"]})
    with pytest.raises(MmiaError, match="no date column .*pass --date-col"):
        after(Source((path,), PRESETS["laion"]), str(tmp_path / "o.parquet"),
              datetime.date(2021, 8, 20), ENGINE)


# --- pool ----------------------------------------------------------------------------------

def test_pool_hides_labels_and_dates(tmp_path):
    m = write_parquet(tmp_path / "m.parquet", {"id": ["m1", "m2", "m3"],
                                               "url": ["u1", "u2", "u3"],
                                               "caption": ["a", "b", "c"],
                                               "date": [None, None, None]})
    n = write_parquet(tmp_path / "n.parquet", {"id": ["n1", "n2"], "url": ["v1", "v2"],
                                               "caption": ["d", "e"],
                                               "date": ["2023-01-01", "2023-02-01"]})
    out, truth = tmp_path / "pool.parquet", tmp_path / "pool.truth.parquet"
    r = pool(Source((m,)), Source((n,)), str(out), seed=5, engine=ENGINE)
    assert (r.members, r.nonmembers, r.rows, r.truth) == (3, 2, 5, str(truth))
    got, labels = rows(out), rows(truth)
    assert all(x["id"].startswith("pool-") and x["date"] is None for x in got)
    assert sorted(x["url"] for x in got) == ["u1", "u2", "u3", "v1", "v2"]
    by_id = {x["id"]: x for x in labels}
    assert {x["url"]: by_id[x["id"]]["member"] for x in got} == {
        "u1": 1, "u2": 1, "u3": 1, "v1": 0, "v2": 0}
    assert sorted(x["source_id"] for x in labels) == ["m1", "m2", "m3", "n1", "n2"]
    assert summary(out)["members"] == 3


def test_pool_refuses_a_url_in_both_inputs(tmp_path):
    m = write_parquet(tmp_path / "m.parquet", {"url": ["u1", "u2"], "caption": ["a", "b"]})
    n = write_parquet(tmp_path / "n.parquet", {"url": ["u2"], "caption": ["other"]})
    with pytest.raises(MmiaError, match=r"1 URLs are in both --members and --nonmembers "
                                        r"\(e.g. 'u2'\)"):
        pool(Source((m,)), Source((n,)), str(tmp_path / "p.parquet"), engine=ENGINE)


# --- download without img2dataset: the command line and its failures --------------------------

def test_shard_pattern():
    assert shard_pattern("s", []) == ""
    assert shard_pattern("s", ["/x/s/00003.tar"]) == "s/00003.tar"
    assert shard_pattern("s", ["/a/00001.tar", "/a/00000.tar", "/a/00002.tar"]) == \
        "s/{00000..00002}.tar"
    assert shard_pattern("s", ["/a/00000.tar", "/a/00002.tar"]) == "s/{00000,00002}.tar"


def _fake_img2dataset(tmp_path, body: str) -> str:
    path = tmp_path / "fake-img2dataset"
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_download_failure_of_img2dataset_is_one_line(tmp_path):
    meta = write_parquet(tmp_path / "m.parquet", {"url": ["u"], "caption": ["c"]})
    fake = _fake_img2dataset(tmp_path, "print('boom: bad option'); sys.exit(3)")
    with pytest.raises(MmiaError, match=r"img2dataset failed \(exit 3\): boom: bad option; "
                                        r"full log .*shards.img2dataset.log"):
        download(Source((meta,)), str(tmp_path / "shards"),
                 DownloadSettings(img2dataset=fake), ENGINE)


def test_download_without_img2dataset_is_one_line(tmp_path):
    meta = write_parquet(tmp_path / "m.parquet", {"url": ["u"], "caption": ["c"]})
    with pytest.raises(MmiaError, match="img2dataset not found .*--img2dataset"):
        download(Source((meta,)), str(tmp_path / "s"),
                 DownloadSettings(img2dataset=str(tmp_path / "nope")), ENGINE)


def test_download_counts_rows_no_shard_reported_as_missing(tmp_path):
    meta = write_parquet(tmp_path / "m.parquet", {"url": ["u1", "u2"], "caption": ["a", "b"]})
    fake = _fake_img2dataset(tmp_path, "print('did nothing')")
    r = download(Source((meta,)), str(tmp_path / "s"), DownloadSettings(img2dataset=fake), ENGINE)
    assert (r.rows, r.downloaded, r.failed, r.missing, r.pattern) == (2, 0, 0, 2, "")
    assert {x["status"] for x in rows(tmp_path / "s.manifest.parquet")} == {"missing"}


def test_download_refuses_repeated_ids(tmp_path):
    meta = write_parquet(tmp_path / "m.parquet", {"id": ["a", "a"], "url": ["u1", "u2"],
                                                  "caption": ["x", "y"]})
    fake = _fake_img2dataset(tmp_path, "")
    with pytest.raises(MmiaError, match="1 rows repeat another row's id"):
        download(Source((meta,)), str(tmp_path / "s"), DownloadSettings(img2dataset=fake),
                 ENGINE)


# --- the command line: bad input is one line, exit 2 ----------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["sample", "{d}/nope.parquet", "-n", "1", "--out", "{d}/o.parquet"],
     "metadata file '{d}/nope.parquet' does not exist"),
    (["sample", "{d}/l.parquet", "-n", "1", "2", "--out", "{d}/o.parquet"],
     "2 sizes (-n) for 1 outputs (--out)"),
    (["sample", "{d}/l.parquet", "-n", "1", "--out", "{d}/o.csv"],
     "--out '{d}/o.csv' must end in .parquet"),
    (["sample", "{d}/l.parquet", "-n", "1", "--out", "{d}/o.parquet"],
     "has no column 'url' for the url: its columns are URL, TEXT; pass --url-col or --preset"),
    (["sample", "{d}/l.dat", "-n", "1", "--out", "{d}/o.parquet"],
     "cannot tell the format of '{d}/l.dat' from its name: pass --format"),
    (["after", "{d}/l.parquet", "--preset", "laion", "--released", "20 Aug 2021", "--out",
      "{d}/o.parquet"], "--released '20 Aug 2021' is not a date: use YYYY-MM-DD"),
    (["sample", "{d}/l.parquet", "--preset", "laion", "--date-col", "when", "-n", "1",
      "--out", "{d}/o.parquet"], "has no column 'when' for the date"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    write_parquet(tmp_path / "l.parquet", {"URL": ["u"], "TEXT": ["t"]})
    (tmp_path / "l.dat").write_text("x")
    d = str(tmp_path)
    code = main(["data"] + [a.format(d=d) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mmia: error: ") and err.count("\n") == 1, err
    assert message.format(d=d) in err


# --- the recipe, end to end, offline ---------------------------------------------------------

RELEASED = "2021-08-20"


def _tag(i: int) -> str:
    """Letters only (normalisation deletes digits), never a stopword: 0 → 'qaa', 27 → 'qbb'."""
    return "q" + chr(97 + i // 26) + chr(97 + i % 26)


def _img2dataset() -> str | None:
    return os.environ.get("MMIA_IMG2DATASET") or shutil.which("img2dataset")


def _web(folder) -> None:
    """The images the metadata points at: laion-5 and rd-11 are missing (404), rd-12 is not an
    image (img2dataset: failed_to_resize)."""
    folder.mkdir()
    names = ([f"laion-{i}" for i in range(24) if i != 5] + [f"cc-{j}" for j in range(20)]
             + [f"rd-{k}" for k in range(11)])
    for seed, name in enumerate(names):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(1000 + seed, size=40))
    (folder / "rd-12.jpg").write_bytes(b"<html>not an image</html>")


def _metadata(d, base: str) -> None:
    """LAION-like training metadata (also the member source), CC12M-like TSV candidates,
    Reddit-like dated JSON lines; the counts each step must give are in the test."""
    laion_urls = [f"{base}/laion-{i}.jpg" for i in range(24)]
    laion_caps = [f"A photo of item {_tag(i)} in the laion collection" for i in range(23)]
    laion_caps.append("In 2019.")  # normalises to nothing
    write_parquet(d / "laion.parquet", {"URL": laion_urls, "TEXT": laion_caps,
                                        "similarity": [0.3] * 24})
    cc = [(laion_urls[0], "Something else entirely"),                        # URL
          (laion_urls[1], laion_caps[1].upper()),                             # URL and caption
          (laion_urls[2], "another caption"),                                 # URL
          (f"{base}/cc-3.jpg", f"PHOTO of ITEM {_tag(3)} IN THE LAION COLLECTION, 2021!"),
          (f"{base}/cc-4.jpg", f"the photo: item {_tag(4)} -- laion collection (4)"),
          (f"{base}/cc-5.jpg", "The 2 of them!")]                              # "": kept
    cc += [(f"{base}/cc-{j}.jpg", f"A photo of item {_tag(j)} in the cc collection")
           for j in range(6, 20)]
    write_lines(d / "cc12m.tsv", [f"{u}\t{c}" for u, c in cc[:10]] + ["a line without a tab"]
                + [f"{u}\t{c}" for u, c in cc[10:]])
    dates = [1600000000, "2021-08-20T12:00:00Z", "2019-05-01", None, "someday",  # not kept
             1650000000, "2022-01-05T10:00:00Z", 1700000000, "2023-03-01", 1660000000,
             1670000000, 1680000000, 1690000000]
    urls = [f"{base}/rd-{k}.jpg" for k in range(13)]
    urls[10] = laion_urls[7]  # after the release, but in LAION: dropped by URL
    write_lines(d / "reddit.jsonl", [
        json.dumps({"id": f"t3_{k}", "url": urls[k], "title": f"My {_tag(k)} reddit post",
                    "created_utc": dates[k]}) for k in range(13)])


def _run(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def _shard_keys(pattern_summary: dict) -> set[tuple[str, str]]:
    import braceexpand

    keys = set()
    for shard in braceexpand.braceexpand(pattern_summary["pattern"]):
        with tarfile.open(shard) as tar:
            keys |= {(os.path.abspath(shard), m.name.split(".")[0]) for m in tar.getmembers()
                     if m.name.endswith(".jpg")}
    return keys


@pytest.mark.skipif(_img2dataset() is None, reason="img2dataset not installed (bash run.sh test "
                    "installs it in .venv/img2dataset and sets MMIA_IMG2DATASET)")
def test_recipe_end_to_end_offline(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.chdir(tmp_path)
    _web(tmp_path / "web")
    i2d = _img2dataset()
    with serve_folder(tmp_path / "web") as base:
        _metadata(tmp_path, base)
        # members and pool members: two disjoint slices of one seeded LAION sample
        _run(["data", "sample", "laion.parquet", "--preset", "laion", "-n", "12", "12",
              "--out", "sets/members.parquet", "sets/pool-members.parquet", "--seed", "0"])
        # CC12M non-members: sample, de-duplicate against LAION, split
        _run(["data", "sample", "cc12m.tsv", "--preset", "cc12m", "-n", "20",
              "--out", "sets/cc12m-sample.parquet", "--seed", "0"])
        _run(["data", "dedup", "sets/cc12m-sample.parquet", "--training", "laion.parquet",
              "--training-preset", "laion", "--out", "sets/cc12m-dedup.parquet"])
        _run(["data", "sample", "sets/cc12m-dedup.parquet", "-n", "10", "5",
              "--out", "sets/nonmembers.parquet", "sets/pool-nonmembers.parquet", "--seed", "1"])
        # post-release known non-members: dated after the release, de-duplicated
        _run(["data", "after", "reddit.jsonl", "--preset", "reddit", "--released", RELEASED,
              "--out", "sets/reddit-after.parquet"])
        _run(["data", "dedup", "sets/reddit-after.parquet", "--training", "laion.parquet",
              "--training-preset", "laion", "--out", "sets/reddit-dedup.parquet"])
        _run(["data", "sample", "sets/reddit-dedup.parquet", "-n", "7",
              "--out", "sets/known-nonmembers.parquet", "--seed", "2"])
        # the WSA pool, its labels apart
        _run(["data", "pool", "--members", "sets/pool-members.parquet", "--nonmembers",
              "sets/pool-nonmembers.parquet", "--out", "sets/pool.parquet", "--seed", "3"])
        for name in ("members", "nonmembers", "known-nonmembers", "pool"):
            _run(["data", "download", f"sets/{name}.parquet", "--out", f"shards/{name}",
                  "--image-size", "64", "--processes", "1", "--download-threads", "4",
                  "--retries", "0", "--timeout", "5", "--img2dataset", i2d])

    members, pool_members = summary("sets/members.parquet"), summary("sets/pool-members.parquet")
    assert (members["rows"], members["written"], pool_members["written"]) == (24, 12, 12)
    cc = summary("sets/cc12m-sample.parquet")
    assert (cc["rows"], cc["unreadable_lines"], cc["written"]) == (20, 1, 20)
    d = summary("sets/cc12m-dedup.parquet")
    assert (d["rows"], d["dropped_url"], d["dropped_caption"], d["kept"],
            d["empty_normalised"]) == (20, 3, 2, 15, 1)
    a = summary("sets/reddit-after.parquet")
    assert (a["rows"], a["kept"], a["not_after"], a["missing_date"], a["unreadable_date"]) == \
        (13, 8, 3, 1, 1)
    rd = summary("sets/reddit-dedup.parquet")
    assert (rd["dropped_url"], rd["dropped_caption"], rd["kept"]) == (1, 0, 7)
    p = summary("sets/pool.parquet")
    assert (p["members"], p["nonmembers"], p["rows"]) == (12, 5, 17)
    truth = rows("sets/pool.truth.parquet")
    assert sum(x["member"] for x in truth) == 12 and len(truth) == 17

    dl = {name: summary(f"shards/{name}") for name in
          ("members", "nonmembers", "known-nonmembers", "pool")}
    assert (dl["nonmembers"]["rows"], dl["nonmembers"]["downloaded"],
            dl["nonmembers"]["failed"]) == (10, 10, 0)
    k = dl["known-nonmembers"]
    assert (k["rows"], k["downloaded"], k["failed_to_download"], k["failed_to_resize"],
            k["missing"]) == (7, 5, 1, 1, 0)
    # laion-5 (404) is a member or in the pool: one failure between the two
    assert dl["members"]["rows"] + dl["pool"]["rows"] == 29
    assert dl["members"]["downloaded"] + dl["pool"]["downloaded"] == 28
    assert dl["members"]["failed_to_download"] + dl["pool"]["failed_to_download"] == 1
    for name, s in dl.items():  # the manifest names every row; its keys are in the shards
        manifest = rows(f"shards/{name}.manifest.parquet")
        assert len(manifest) == s["rows"]
        done = {(x["shard"], x["key"]) for x in manifest if x["status"] == "success"}
        assert len(done) == s["downloaded"] and done == _shard_keys(s)
    failed = {x["url"].rsplit("/", 1)[1]: x["error"] for x in
              rows("shards/known-nonmembers.manifest.parquet") if x["status"] != "success"}
    assert set(failed) == {"rd-11.jpg", "rd-12.jpg"} and "404" in failed["rd-11.jpg"]

    _run(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
          "--members", dl["members"]["pattern"], "--nonmembers", dl["nonmembers"]["pattern"],
          "--known-nonmembers", dl["known-nonmembers"]["pattern"],
          "--pool", dl["pool"]["pattern"], "--attacks", "csa,aea,wsa,blind", "--views", "2",
          "--cache", "cache", "--out", "audit-out", "--device", "cpu", "--workers", "1",
          "--no-progress"])
    metrics = json.loads(open("audit-out/metrics.json").read())
    assert {role: metrics["data"][role]["samples"] for role in metrics["data"]} == {
        "members": dl["members"]["downloaded"], "nonmembers": 10, "known_nonmembers": 5,
        "pool": dl["pool"]["downloaded"]}
    assert set(metrics["attacks"]) == {"csa", "aea", "wsa", "blind"}
    assert metrics["attacks"]["csa"]["n_members"] == dl["members"]["downloaded"]
    assert metrics["attacks"]["wsa"]["n_known_nonmembers"] == 5
