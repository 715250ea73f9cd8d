"""The results.csv / selection.csv format and the selection rules (pipeline.results)."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest

from pipeline.heads import config
from pipeline.names import BEST_BY_TEST, BEST_BY_VAL
from pipeline.results import (
    RESULT_COLUMNS,
    SETTING_COLUMNS,
    HeadConfig,
    ResultRow,
    ResultsFormatError,
    Setting,
    mean_datasets,
    metrics,
    nan_mean,
    read_result_rows,
    select_runs,
    selection_record,
    summarize_configs,
    summarize_runs,
    write_csv,
)

SETTING = Setting(
    model="m", tap="ln2", train="train_4class", epochs=1, batch_size=128, lr=0.001, lr_milestones=(6, 11),
    classes="chair+horse", n_classes=2, train_fraction=1.0, head_blocks="all", aggregation="tie", seed=0, amp="none",
)  # fmt: skip
BASE = ResultRow(run="r", status="ok", error="", grid="g", head=HeadConfig(0.2, 2, 64), setting=SETTING, n_params=10,
                 fit_seconds=1.5, views_used=1, views_reused=0)  # fmt: skip


def scored(
    run: str, split: str, dataset: str, acc: float, ap: float, variant: str = "center", epochs: int = 1,
    head: HeadConfig | None = None, seed: int = 0,
) -> ResultRow:  # fmt: skip
    values = {name: 0.5 for name in metrics.METRIC_NAMES} | {"acc": acc, "ap": ap}
    setting = dataclasses.replace(SETTING, epochs=epochs, seed=seed)
    head = head or HeadConfig(0.2, 2, 64 + sum(map(ord, run)))  # distinct runs: distinct configs unless told
    return dataclasses.replace(BASE, run=run, split=split, variant=variant, dataset=dataset, n=10, n_invalid=0,
                               metrics=values, setting=setting, head=head)  # fmt: skip


def test_every_run_config_field_is_a_column_and_rows_round_trip(tmp_path):
    assert set(f.name for f in dataclasses.fields(config.RunConfig)) <= set(RESULT_COLUMNS)
    assert RESULT_COLUMNS[:14] == ("run", "status", "error", "grid", "model", "tap", "train", "head", "features",
                                   "k", "C", "contrastive_factor", "proj_layers", "proj_dim")  # fmt: skip
    assert set(SETTING_COLUMNS) | set(RESULT_COLUMNS[7:14]) | {"n_classes"} >= {
        f.name for f in dataclasses.fields(config.RunConfig)
    }
    assert RESULT_COLUMNS[-len(metrics.METRIC_NAMES) :] == metrics.METRIC_NAMES
    rows = [
        scored("a", "val", "progan", 0.9, math.nan),
        dataclasses.replace(BASE, status="error", error="boom", setting=dataclasses.replace(SETTING, n_classes=None)),
    ]
    write_csv(tmp_path / "results.csv", RESULT_COLUMNS, (row.to_csv() for row in rows))
    text = (tmp_path / "results.csv").read_text().splitlines()
    assert text[1].split(",")[RESULT_COLUMNS.index("lr_milestones")] == "6+11"
    back = [row for _, row in read_result_rows(tmp_path / "results.csv")]
    assert back[1] == rows[1]
    assert back[0].metrics["acc"] == 0.9 and math.isnan(back[0].metrics["ap"])
    assert dataclasses.replace(back[0], metrics=None) == dataclasses.replace(rows[0], metrics=None)


def test_a_bad_value_names_the_file_line_and_column(tmp_path):
    record = scored("a", "val", "progan", 0.9, 0.8).to_csv()
    write_csv(tmp_path / "results.csv", RESULT_COLUMNS, [record, {**record, "proj_dim": "wide"}])
    with pytest.raises(ResultsFormatError, match=r"results\.csv:3: column proj_dim: 'wide'"):
        read_result_rows(tmp_path / "results.csv")
    write_csv(tmp_path / "results.csv", RESULT_COLUMNS, [{**record, "status": "maybe"}])
    with pytest.raises(ResultsFormatError, match="status: 'maybe' is not one of ok, error, no_valid_rows"):
        read_result_rows(tmp_path / "results.csv")


def test_the_paper_sets_form_the_mean_when_present_else_all_sets():
    assert mean_datasets(["whichfaceisreal", "dalle", "progan"]) == (("progan", "dalle"), ("whichfaceisreal",))
    assert mean_datasets(["mine_b", "mine_a"]) == (("mine_a", "mine_b"), ())
    assert nan_mean([1.0, math.nan, 0.0]) == 0.5 and math.isnan(nan_mean([math.nan]))


def test_selection_by_val_and_by_mean_test_acc_ap_per_setting_with_the_20_set_rule():
    rows = [
        # run a: best val; run b: best test mean over the paper sets; whichfaceisreal and perturbed rows do not count
        scored("a", "val", "progan", 0.99, 0.99), scored("a", "test", "progan", 0.7, 0.7),
        scored("a", "test", "whichfaceisreal", 1.0, 1.0), scored("a", "test_jpeg", "progan", 1.0, 1.0, variant="jpeg-official"),
        scored("b", "val", "progan", 0.80, 0.99), scored("b", "test", "progan", 0.8, 0.8),
        scored("b", "test", "whichfaceisreal", 0.0, 0.0),
        # run c: another setting (3 epochs), alone in it
        scored("c", "val", "progan", 0.5, 0.5, epochs=3), scored("c", "test", "progan", 0.5, 0.5, epochs=3),
        dataclasses.replace(BASE, run="d", status="error", error="x"),
    ]  # fmt: skip
    summaries = summarize_runs(rows)
    assert set(summaries) == {"a", "b", "c"}
    assert (summaries["a"].mean_acc, summaries["a"].excluded_from_mean) == (0.7, ("whichfaceisreal",))
    chosen = [(s.rule, s.summary.run) for s in select_runs(summaries.values())]
    assert chosen == [(BEST_BY_VAL, "a"), (BEST_BY_TEST, "b"), (BEST_BY_VAL, "c"), (BEST_BY_TEST, "c")]
    tie = [scored(run, "test", "progan", 0.5, 0.5) for run in ("x", "y")]
    assert [s.summary.run for s in select_runs(summarize_runs(tie).values())] == ["y", "y"]  # ties: the larger id


def test_seeds_of_a_config_are_selected_by_their_mean_and_reported_with_mean_and_std():
    """Config A has the best single run, config B the best mean over seeds 0, 1, 2: B is selected."""
    head_a, head_b = HeadConfig(0.1, 1, 32), HeadConfig(0.8, 2, 64)
    test_acc = {("a", 0): 0.99, ("a", 1): 0.60, ("a", 2): 0.61, ("b", 0): 0.80, ("b", 1): 0.82, ("b", 2): 0.78}
    rows = []
    for (name, seed), acc in test_acc.items():
        head = head_a if name == "a" else head_b
        run = f"{name}{seed}"
        rows += [scored(run, "val", "progan", acc, acc, head=head, seed=seed),
                 scored(run, "test", "progan", acc, acc, head=head, seed=seed),
                 scored(run, "test", "dalle", acc, 0.9, head=head, seed=seed)]  # fmt: skip
    selections = select_runs(summarize_runs(rows).values())
    assert [(s.rule, s.summary.run) for s in selections] == [(BEST_BY_VAL, "b0"), (BEST_BY_TEST, "b0")]
    record = selection_record(selections[1])
    b_accs = [test_acc["b", seed] for seed in range(3)]
    b_aps = [(acc + 0.9) / 2 for acc in b_accs]
    assert (record["n_seeds"], record["seeds"], record["seed"]) == ("3", "0+1+2", "0")
    assert float(record["mean_acc"]) == pytest.approx(statistics.mean(b_accs))
    assert float(record["mean_ap"]) == pytest.approx(statistics.mean(b_aps))
    assert float(record["mean_acc_std"]) == pytest.approx(statistics.stdev(b_accs))
    assert float(record["mean_ap_std"]) == pytest.approx(statistics.stdev(b_aps))
    configs = {config.run: config for config in summarize_configs(summarize_runs(rows).values())}
    assert set(configs) == {"a0", "b0"} and configs["a0"].seeds == (0, 1, 2)
    single = selection_record(select_runs(summarize_runs(rows[:3]).values())[0])
    assert (single["n_seeds"], single["seeds"], single["mean_acc_std"]) == ("1", "0", "nan")


def test_selecting_across_epochs_picks_the_authors_ldm_model_from_their_24_runs():
    """Their results/diffusion runs: one best over 1, 3 and 5 epochs (xi 0.4, q 4, d' 1024 at 5), not one per count."""
    from pipeline.results.reference import group_reference_runs, load_reference_ldm

    rows = []
    for key, scores in group_reference_runs(load_reference_ldm()).items():
        head = key.head_config
        run = f"{head.label()}@{key.epochs}"
        for dataset, (acc, ap) in scores.items():
            rows.append(scored(run, "synthbuster", dataset, acc, ap, variant="tencrop", epochs=key.epochs, head=head))
    assert len({row.run for row in rows}) == 24
    summaries = summarize_runs(rows).values()
    across = [s for s in select_runs(summaries, across=("epochs",)) if s.rule == BEST_BY_TEST]
    assert [(s.config.representative.row.head, s.summary.row.setting.epochs) for s in across] == [
        (HeadConfig(0.4, 4, 1024), 5)
    ]
    per_epochs = [s for s in select_runs(summaries) if s.rule == BEST_BY_TEST]
    assert sorted(s.summary.row.setting.epochs for s in per_epochs) == [1, 3, 5]  # the old grouping: one per count
