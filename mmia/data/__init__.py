"""From image–caption metadata to audit-ready shards: `mmia data sample | dedup | after | pool |
download`.

Every step reads metadata files (Parquet, CSV/TSV, JSON lines) through DuckDB with a column
mapping (`metadata.PRESETS`), streams them (nothing proportional to the training metadata is held
in Python) and writes Parquet in one canonical schema — `id, url, caption, date` — plus a small
`<output>.summary.json` of counts. The functions return result objects; `mmia.data.cli` prints.
"""

from mmia.data.dedup import STOPWORDS, DedupResult, dedup, normalise_captions
from mmia.data.download import DownloadResult, DownloadSettings, download
from mmia.data.metadata import PRESETS, Engine, Source
from mmia.data.select import AfterResult, PoolResult, SampleResult, after, pool, sample

__all__ = [
    "PRESETS", "STOPWORDS", "AfterResult", "DedupResult", "DownloadResult", "DownloadSettings",
    "Engine", "PoolResult", "SampleResult", "Source", "after", "dedup", "download",
    "normalise_captions", "pool", "sample",
]
