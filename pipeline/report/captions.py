"""What the page says under each table and figure: one place for the notes and captions (add a new table's or
figure's here). Figure titles stay short; the detail is in these captions.
"""

from __future__ import annotations

UNITS = "ACC and AP in percent (one decimal)."
TABLE_NOTES: dict[str, str] = {
    "acc.csv": f"Paper Table 2: ACC per test set of each selected config. {UNITS} setting_id: see settings.csv.",
    "ap.csv": f"Paper Table 3: AP per test set of each selected config. {UNITS}",
    "best.csv": "Paper Table 1: each selected config, its size and fit time (seconds).",
    "ablations.csv": (
        "Paper Table 4: the full model against each ablation, mean over all and over non-GAN test sets. Each row's "
        "xi / q / d' (contrastive_factor, proj_layers, proj_dim) are the hyper-parameters that ablation ran with; "
        "same_hyper_as_full = no marks an ablation compared across hyper-parameters (the grid had no run of it with "
        "the full model's), which mixes the ablation's effect with the config's."
    ),
    "grid.csv": "Every run: val and mean test ACC / AP (percent) with the 95 % intervals of the test means.",
    "metrics.csv": "Every run x set, every metric: rates in percent (_pct), thresholds and the Brier score with 4 "
    "significant digits; results.csv keeps the full precision.",
    "errors.csv": "Where the errors are, per selected run, split, set and bucket (percent).",
    "format_align.csv": "ACC / AP as the files are (center) and format-aligned, and the change in points (_pts).",
    "tie.csv": "TIE block weights (softmax over blocks, mean over the projection dims; uniform = 1 / blocks).",
    "settings.csv": "The legend of setting_id: every setting a table names, in full but for the seed (the seeds of "
    "one config share an id; the tables name each run and its seeds).",
    "seeds.csv": "Mean and standard deviation over seeds (percent).",
    "detectors.csv": "Every selected detector (backbone, head, features) with ACC / AP per test set, their 95 % "
    "intervals and the mean (percent): RINE beside the probes, same images, crops and metrics.",
    "blocks.csv": "Which block knows most: per block, the val and mean test AP of a logistic-regression probe on "
    "that block's token (the best C by val), beside RINE's TIE weight of the block.",
    "cross_dataset_acc.csv": "Cross-dataset ACC (percent): one row per training cell (protocol, datasets trained "
    "on), one column per test set with its 95 % interval, and the mean over the sets the row did not train on.",
    "cross_dataset_ap.csv": "Cross-dataset AP (percent), as cross_dataset_acc.csv.",
}

# (file name prefix, suffix) -> caption, first match wins.
FIGURE_CAPTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "ranked",
        ".png",
        "Every config ranked by its val ACC (the best-by-val rule reads the top), against its mean test "
        "ACC with the 95 % interval where computed; the selected configs are marked. The dashed line is chance (50 %).",
    ),
    (
        "per_dataset_",
        ".png",
        "ACC and AP per test set of the selected config (ours; the authors' beside it where "
        "published). The dashed line is chance (50 %).",
    ),
    (
        "hyperparams_box",
        ".png",
        "Mean test ACC and AP of every run per value of each searched hyper-parameter "
        "(paper Figs. 3-4), all settings pooled.",
    ),
    ("epochs", ".png", "Mean test ACC and AP against training length (mean and best over head configs)."),
    ("fraction", ".png", "Mean test ACC and AP against the fraction of the training set used."),
    (
        "tie",
        ".png",
        "TIE block importance of each setting's selected run: softmax(alpha) per block, mean over the "
        "projection dims; the dotted line is uniform weight (1 / blocks).",
    ),
    ("tsne_", ".png", "t-SNE of the head's embedding z on the test sets: reals, GAN fakes, other fakes."),
    (
        "run_",
        "_scores.png",
        "Score histograms of reals and fakes per test set, with 0.5 and the thresholds chosen on "
        "val (val, EER, FPR 1 %, FPR 5 %) marked; one legend for all panels.",
    ),
    (
        "run_",
        "_reliability.png",
        "Reliability: the fraction of fakes against the mean score per bin, for val and each "
        "test split (ECE and Brier score in the legend); below, the share of images per bin.",
    ),
    ("run_", "_tie.png", "This run's TIE block weights; the dotted line is uniform weight (1 / blocks)."),
    (
        "which_block",
        ".png",
        "Per backbone: the val and mean test AP of a logistic-regression probe on each block's token (left axis, "
        "percent) and RINE's TIE weight of that block (right axis, from 0).",
    ),
    (
        "cross_dataset",
        ".png",
        "Cross-dataset ACC (percent): rows are the datasets trained on, columns the test sets and the mean off the "
        "diagonal; * marks a set the row trained on.",
    ),
)


def figure_caption(name: str) -> str:
    """The caption of a figure file of the report ('' for one this version does not describe)."""
    return next(
        (text for prefix, suffix, text in FIGURE_CAPTIONS if name.startswith(prefix) and name.endswith(suffix)), ""
    )
