"""The evaluation report: ``evaluate_report.md`` and its PNG plots, for a person deciding whether
to trust a model: the standard metrics, where the thresholds came from, and the worst mistakes.

    evaluate_report/
      evaluate_report.md           metrics, thresholds, confusion counts, per defect type
      roc_curve.png                image and pixel ROC, with the calibrated operating point
      pro_curve.png                PRO over the FPR range AUPRO integrates
      score_histogram.png          raw image scores of good and defective images, thresholds drawn
      worst_false_positives.png    good images flagged, highest score first (when there are any)
      worst_false_negatives.png    defective images passed as OK, lowest score first
      scores.csv                   every image: its label, raw and normalised score, decision, fitted on

Plots use matplotlib's object API (``Figure``), which needs no display and no pyplot state.
"""

from __future__ import annotations

import csv
import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import roc_curve

from flawscope.data.io import read_mask
from flawscope.evaluation import metrics
from flawscope.errors import printable
from flawscope.evaluation.evaluate import Collected
from flawscope.inference.model_dir import staged_dir
from flawscope.inference.predictor import Predictor

WORST = 8  # images per grid of worst mistakes
_COLUMNS = 4
_GRID_PIXELS = 600  # the longer side of a picture in a grid: more than its ~3 inches at the figure's dpi
_GOOD, _DEFECT, _THRESHOLD = "#2a9d8f", "#e76f51", "#264653"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")  # makes room for titles and legends


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return path.name


def plot_roc(collected: Collected, result: dict, path: Path) -> str | None:
    """Image and pixel ROC curves; the dot is where the calibrated image threshold operates."""
    outcomes = collected.outcomes
    m = result["metrics"]
    labels = np.array([o.sample.label for o in outcomes])
    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    drawn = False
    if m["image_auroc"] is not None:
        fpr, tpr, _ = roc_curve(labels, [o.raw_score for o in outcomes])
        ax.plot(fpr, tpr, color=_DEFECT, lw=2, label=f"image (AUROC {m['image_auroc']:.3f})")
        if m["image_fpr"] is not None and m["image_recall"] is not None:
            ax.plot([m["image_fpr"]], [m["image_recall"]], "o", color=_THRESHOLD, ms=8,
                    label="calibrated image threshold")
        drawn = True
    curve = metrics.pixel_roc_curve(collected.pixels().scores)
    if curve is not None:
        ax.plot(*curve, color=_GOOD, lw=2, label=f"pixel (AUROC {m['pixel_auroc']:.3f})")
        drawn = True
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title="ROC curves")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pro(collected: Collected, result: dict, path: Path) -> str | None:
    """The PRO curve over [0, fpr_limit], the part AUPRO integrates, with that area shaded."""
    curve = metrics.pro_curve(collected.pixels().scores)
    if curve is None:
        return None
    limit = result["aupro_fpr_limit"]
    fpr, pro = curve
    inside = fpr <= limit
    x = np.append(fpr[inside], limit)
    y = np.append(pro[inside], np.interp(limit, fpr, pro))
    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    ax.plot(x, y, color=_DEFECT, lw=2)
    ax.fill_between(x, y, color=_DEFECT, alpha=0.15, label=f"AUPRO {result['metrics']['aupro']:.3f} (normalised)")
    ax.set(xlim=(0, limit), ylim=(0, 1.01), xlabel="false positive rate (pixels)",
           ylabel="per-region overlap", title=f"PRO curve up to FPR {limit}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_histogram(collected: Collected, result: dict, path: Path) -> str:
    """Raw image scores of good and defective images with the calibrated threshold (score 0.5)."""
    outcomes = collected.outcomes
    good = [o.raw_score for o in outcomes if o.sample.label == 0]
    defect = [o.raw_score for o in outcomes if o.sample.label == 1]
    everything = good + defect
    bins = np.histogram_bin_edges(everything, bins=min(40, max(10, len(everything) // 3)))
    fig = _figure(7, 4.8)
    ax = fig.add_subplot()
    for scores, color, name in ((good, _GOOD, "good"), (defect, _DEFECT, "defective")):
        if scores:
            ax.hist(scores, bins=bins, color=color, alpha=0.6, label=f"{name} ({len(scores)})")
    ax.axvline(result["thresholds"]["image"]["raw"], color=_THRESHOLD, lw=2,
               label="calibrated threshold (score 0.5)")
    best = result["metrics"]["best_f1_thresholds"]["image"]
    if best is not None:
        ax.axvline(best, color=_THRESHOLD, lw=1.5, ls="--", label="best-F1 threshold on this split")
    ax.set(xlabel="raw image score (as the model gives it, before normalisation)", ylabel="images",
           title="Image scores: good vs defective")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_grid(predictor: Predictor, chosen: Sequence, title: str, path: Path) -> str:
    """What ``predict`` shows for each image (heat map, red predicted outline, verdict), with the
    ground-truth outline in cyan."""
    rows = -(-len(chosen) // _COLUMNS)
    cols = min(_COLUMNS, len(chosen))
    fig = _figure(max(3.2 * cols, 6.5), 3.4 * rows + 0.5)
    fig.suptitle(title, parse_math=False)
    results = predictor.predict([str(o.sample.image) for o in chosen], on_error="raise")
    for index, (outcome, res) in enumerate(zip(chosen, results)):
        ax = fig.add_subplot(rows, cols, index + 1)
        # Shown a few hundred pixels wide: the figure holds every picture until it is saved, and
        # eight 16 MP overlays at full size took 700 MB and half a minute more to draw.
        picture = res.img["res"]
        picture.thumbnail((_GRID_PIXELS, _GRID_PIXELS))
        ax.imshow(picture)
        if outcome.mask_pixels:  # read again: evaluation keeps no mask
            mask = Image.fromarray(read_mask(outcome.sample.mask).astype(np.uint8) * 255).resize(
                picture.size, Image.Resampling.BILINEAR)
            ax.contour(np.asarray(mask), levels=[127.5], colors="cyan", linewidths=1)
        # as written, not as a formula ("cost_$5_$10.png" failed as mathtext)
        ax.set_title(printable(f"{outcome.sample.image.name} ({outcome.sample.defect_type})\nscore {res.score:.3f}"),
                     fontsize=9, parse_math=False)
        ax.axis("off")
    return _save(fig, path)


def _worst(outcomes: Sequence) -> tuple[list, list]:
    """Good images flagged (highest score first) and defective ones passed (lowest first)."""
    false_pos = sorted((o for o in outcomes if o.sample.label == 0 and o.is_anomaly),
                       key=lambda o: -o.raw_score)
    false_neg = sorted((o for o in outcomes if o.sample.label == 1 and not o.is_anomaly),
                       key=lambda o: o.raw_score)
    return false_pos[:WORST], false_neg[:WORST]


def _pixel_fpr_text(m: dict) -> str:
    """The pixel FPR, and its two parts apart: on good images, where the pixel threshold's target
    is set (most are judged OK, with empty masks), and on the good pixels of defective images,
    beside their defects, where most false alarms of a model that finds the defects lie."""
    pixel, good = m["confusion"]["pixel"], m["confusion"].get("pixel_good_images")
    if good is None:
        return _pct(m["pixel_fpr"])
    rest = {k: pixel[k] - good[k] for k in ("fp", "tn")}
    fpr = [c["fp"] / (c["fp"] + c["tn"]) if c["fp"] + c["tn"] else None for c in (good, rest)]
    return f"{_pct(m['pixel_fpr'])} ({_pct(fpr[0])} on good images, {_pct(fpr[1])} on defective images' good pixels)"


def _joined_caveat(thresholds: dict) -> str:
    """The thresholds of a model whose banks took its held-out images after calibration are the
    model's before: say so where its bound is stated."""
    joined = thresholds.get("images_joined_after_calibration")
    if not joined:
        return ""
    return (f" The thresholds and their bound are those of the model before the {joined} held-out images joined "
            "its banks (`Train.add_calibration_images`): the saved model's scores moved a little with them, so "
            "the bound holds only approximately.")


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines; a ``|`` in a cell (a defect type's folder name) would split it."""
    rows = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]


def write_report(directory: Path, result: dict, collected: Collected, predictor: Predictor) -> Path:
    """Write the plots and ``evaluate_report.md`` into ``directory``, which replaces an earlier
    report whole once this one is complete (``staged_dir``): a rerun that fails leaves no mix of
    the two runs' plots. Returns the Markdown path."""
    with staged_dir(directory) as staging:
        _write_report(staging, result, collected, predictor)
    return directory / "evaluate_report.md"


def _write_report(directory: Path, result: dict, collected: Collected, predictor: Predictor) -> None:
    m, t = result["metrics"], result["thresholds"]
    image_c, pixel_c = m["confusion"]["image"], m["confusion"]["pixel"]
    details = t["calibration"]
    target = (f"target FPR {_pct(details.get('image_fpr'))} on good images"
              if t["method"] == "fpr" else "F1-optimal on labelled calibration defects")
    lines = [
        "# Evaluation report", "",
        f"- Model: `{result['model_dir']}` ({predictor.info.model})",
        f"- Dataset: `{result['dataset_dir']}`: {m['num_images']} images, {m['num_good']} good, "
        f"{m['num_defect']} defective, {m['num_with_masks']} with pixel ground truth",
        f"- Written {datetime.datetime.now().isoformat(timespec='seconds')}", "",
        *[line for w in result["warnings"] for line in (f"> **Warning:** {w}", "")],
        "## Image level (is the part defective?)", "",
        *_table([
            ["metric", "value"],
            ["AUROC", _fmt(m["image_auroc"])],
            ["Average precision", _fmt(m["image_ap"])],
            ["F1 at the calibrated threshold", _fmt(m["image_f1"])],
            ["precision / recall at the calibrated threshold",
             f"{_fmt(m['image_precision'])} / {_fmt(m['image_recall'])}"],
            ["good images flagged (FPR)", f"{_pct(m['image_fpr'])} ({image_c['fp']} of "
                                          f"{image_c['fp'] + image_c['tn']})"],
            ["best F1 (threshold fitted on this split: an upper bound)", _fmt(m["image_best_f1"])],
        ]), "",
        "## Pixel level (where is the defect?)", "",
        *_table([
            ["metric", "value"],
            ["AUROC", _fmt(m["pixel_auroc"])],
            [f"AUPRO (FPR up to {result['aupro_fpr_limit']}, normalised to [0, 1])", _fmt(m["aupro"])],
            ["F1 / IoU of the predicted masks", f"{_fmt(m['pixel_f1'])} / {_fmt(m['pixel_iou'])}"],
            ["precision / recall of the predicted masks",
             f"{_fmt(m['pixel_precision'])} / {_fmt(m['pixel_recall'])}"],
            ["good pixels flagged (FPR)", _pixel_fpr_text(m)],
            ["best F1 over all pixel thresholds (fitted on this split)", _fmt(m["pixel_best_f1"])],
            ["PaddleX-compatible mIoU", _fmt(m["paddlex_miou"])],
        ]), "",
        "Predicted masks are what `predict` returns: an image judged OK gets an empty mask, so a "
        "defect on it counts as missed pixels. AUROC, AUPRO and best F1 rank the raw maps and do "
        "not depend on the thresholds.", "",
        "PaddleX-compatible mIoU: the share of good pixels whose raw score stays at or below 0.01 "
        "(after an opening of radius 4), defect pixels ignored; it measures false alarms only, "
        "not whether defects are found.", "",
        "## Thresholds", "",
        *_table([
            ["level", "raw threshold", "normalised", "how it was fitted"],
            ["image", f"{t['image']['raw']:.6g}", "0.5", target],
            ["pixel", f"{t['pixel']['raw']:.6g}", "0.5",
             f"target FPR {_pct(details.get('pixel_fpr'))} on good pixels" if t["method"] == "fpr"
             else "F1-optimal on labelled calibration defects"],
        ]), "",
        f"Fitted on {t['source']} ({details.get('num_good', details.get('num_images', '?'))} good images"
        f"{', ' + str(details['num_defect']) + ' defective' if details.get('num_defect') else ''}). "
        "Scores are normalised so that 0.5 is the threshold; the model "
        "directory stores both, so predict, evaluate and the exported models decide the same way."
        + (f" A new good part exceeds the image threshold with probability at most "
           f"{_pct(details['image_fpr_bound'])} (conformal bound from the calibration images)."
           if details.get("image_fpr_bound") is not None else "") + _joined_caveat(t), "",
        "## Confusion counts at the calibrated thresholds", "",
        *_table([["level", "TP", "FP", "FN", "TN"],
                 ["image", *(str(image_c[k]) for k in ("tp", "fp", "fn", "tn"))],
                 ["pixel", *(str(pixel_c[k]) for k in ("tp", "fp", "fn", "tn"))]]), "",
    ]
    if m["per_defect_type"]:
        lines += ["## Per defect type (each with all good images)", "",
                  *_table([["type", "images", "image AUROC", "detected", "pixel AUROC", "AUPRO", "pixel F1", "IoU"],
                           *[[name, str(v["count"]), _fmt(v["image_auroc"]), _pct(v["image_recall"]),
                              _fmt(v["pixel_auroc"]), _fmt(v["aupro"]), _fmt(v["pixel_f1"]),
                              _fmt(v["pixel_iou"])] for name, v in m["per_defect_type"].items()]]), ""]
    lines += ["## Plots", ""]
    plots = {"roc_curve.png": plot_roc, "pro_curve.png": plot_pro, "score_histogram.png": plot_histogram}
    for name, plot in plots.items():
        saved = plot(collected, result, directory / name)
        lines += [f"![{name[:-4]}]({saved})" if saved else f"{name[:-4]}: n/a (needs good and defective data)", ""]
    grids = (("Worst false positives (good images flagged)", "worst_false_positives.png"),
             ("Worst false negatives (defective images passed as OK)", "worst_false_negatives.png"))
    for (heading, name), chosen in zip(grids, _worst(collected.outcomes)):
        lines += [f"## {heading}", ""]
        if chosen:
            lines += ["Red: predicted outline; cyan: ground truth.", "",
                      f"![{name[:-4]}]({plot_grid(predictor, chosen, heading, directory / name)})", ""]
        else:
            lines += ["None at the calibrated threshold.", ""]
    lines += ["## Every image", "", "[scores.csv](scores.csv): each image's label, defect type, raw and normalised "
              "score and decision, its mask's defect pixels and whether the model was fitted on it, to audit or "
              "re-threshold without predicting again.", ""]
    _write_scores(collected, directory / "scores.csv")
    (directory / "evaluate_report.md").write_text(printable("\n".join(lines)), encoding="utf-8")


def _write_scores(collected: Collected, path: Path) -> None:
    # a file name that is not UTF-8 is written as its own bytes: the path that opens the file
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "defect_type", "raw_score", "score", "is_anomaly", "mask", "mask_pixels",
                         "fitted"])
        for o in collected.outcomes:
            writer.writerow([os.path.abspath(o.sample.image), o.sample.label, o.sample.defect_type, float(o.raw_score),
                             "" if o.score is None else float(o.score), "" if o.is_anomaly is None else bool(o.is_anomaly),
                             os.path.abspath(o.sample.mask) if o.sample.mask else "",
                             "" if o.mask_pixels is None else o.mask_pixels, o.fitted])
