"""experiments/scaling_law.py on a tiny grid: its cells, tables, verdict and key=value line."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "experiments" / "scaling_law.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("scaling_law", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sl = _load_script()


@pytest.fixture(scope="module")
def sweep(tiny_config, tmp_path_factory):
    work = tmp_path_factory.mktemp("scaling")
    settings = sl.SweepSettings(epochs=3, threads=1, max_steps=2, model_config=tiny_config)
    cells = sl.run_sweep((90, 60), (0,), settings, work)
    return cells, settings, work


def test_cells_cover_the_grid_with_valid_figures(sweep):
    cells, _, _ = sweep
    assert [(c.members, c.seed) for c in cells] == [(60, 0), (90, 0)]  # sizes ascending
    for c in cells:
        assert c.n_eval == c.members // 3  # pilot_configs: min(300, members // 3)
        assert c.steps == 2 and c.passes == 2.0  # one batch per epoch: min(100, members)
        assert 0.0 <= c.auc_ci[0] <= c.auc <= c.auc_ci[1] <= 1.0
        assert 0.0 <= c.tpr1 <= 1.0 and 0 < c.train_s <= c.wall_s and c.n_params > 0


def test_finished_cells_are_reused_only_under_the_same_settings(sweep):
    cells, settings, work = sweep
    assert sl.load_cell(work, 60, 0, settings) == cells[0]
    assert sl.load_cell(work, 60, 0, sl.SweepSettings(epochs=2, max_steps=2,
                                                      model_config=settings.model_config)) is None
    assert sl.load_cell(work, 60, 1, settings) is None


def test_markdown_has_a_row_per_cell_and_per_size(sweep):
    cells, settings, _ = sweep
    summary = sl.summarise(cells)
    text = sl.markdown(cells, summary, settings, "python experiments/scaling_law.py", 1.0)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    cell_rows = [r for r in rows if r.count("|") == 10 and not r.startswith("| members")]
    size_rows = [r for r in rows if r.count("|") == 9 and not r.startswith("| members")]
    assert [r.split("|")[1:3] for r in cell_rows] == [[" 60 ", " 0 "], [" 90 ", " 0 "]]
    assert [r.split("|")[1] for r in size_rows] == [" 60 ", " 90 "]
    assert "Command: `python experiments/scaling_law.py`" in text
    assert "fewer at small sizes (20 at 60, 30 at 90 members)" in text
    assert "Mean CSA AUC over seeds" in text and "Why:" in text


def _summary(members: int, auc: float, sd: float = 0.01) -> object:
    return sl.SizeSummary(members=members, n_seeds=3, n_eval=300, steps=members // 100 * 15,
                          passes=15.0, final_loss=1.0, n_params=1000, auc_mean=auc, auc_sd=sd,
                          auc_half_width=0.03, tpr1_mean=0.05, train_s=1.0)


@pytest.mark.parametrize("aucs, expected", [
    ((0.94, 0.80, 0.65, 0.51), "falls"),
    ((0.60, 0.75, 0.84, 0.85), "rises"),
    ((0.60, 0.84, 0.70, 0.55), "rises-then-falls"),
    ((0.60, 0.84, 0.83, 0.83), "rises-then-flat"),
    ((0.80, 0.81, 0.80, 0.80), "flat"),
])
def test_trend_reads_the_means_against_the_seed_spread(aucs, expected):
    summary = [_summary(n, a) for n, a in zip((250, 500, 1000, 2000), aucs, strict=True)]
    assert sl.trend(summary) == expected
    text = sl.verdict(summary, sl.SweepSettings(), 100)
    assert ("does not reproduce" in text) == (expected in ("rises", "rises-then-flat", "flat"))


def test_key_values_line(sweep):
    cells, _, _ = sweep
    line = sl.key_values(cells, 3.0)
    pairs = dict(kv.split("=", 1) for kv in line.split())
    assert pairs["sizes"] == "60,90" and pairs["seeds"] == "0" and pairs["invocation_s"] == "3"
    assert pairs["total_s"] == f"{cells[0].wall_s + cells[1].wall_s:.0f}"
    assert all(0.0 <= float(a) <= 1.0 for a in pairs["auc_mean"].split(","))
