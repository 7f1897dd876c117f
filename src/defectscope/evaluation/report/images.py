"""The report's image sections: thumbnails, the gallery of mistakes, Grad-CAM heatmaps."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.evaluation.report.html import esc, img

log = logging.getLogger(__name__)

GALLERY_SIZE = 12


class Thumbs:
    """Loads each image once, at the size the model saw; unreadable files give None (and one log line)."""

    def __init__(self, paths: Sequence[str], size: int, mode: str):
        self.paths, self.size, self.mode = paths, size, mode
        self.cache: dict[int, np.ndarray | None] = {}

    def __call__(self, i: int) -> np.ndarray | None:
        if i not in self.cache:
            from defectscope.data.images import load_gray

            try:
                self.cache[i] = load_gray(self.paths[i], self.size, self.mode)
            except Exception as exc:  # a moved or deleted file must not sink the whole report
                log.warning(f"report: cannot show {self.paths[i]}: {exc}")
                self.cache[i] = None
        return self.cache[i]


def gallery_indices(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(most confident mistakes, least confident correct predictions), up to GALLERY_SIZE each."""
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.nonzero(pred != y_true)[0]
    right = np.nonzero(pred == y_true)[0]
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:GALLERY_SIZE]
    right = right[np.argsort(conf[right], kind="stable")][:GALLERY_SIZE]
    return wrong, right


def grid(indices: Sequence[int], thumbs: Thumbs, captions: Sequence[str], path: Path, title: str,
          overlays: Sequence[np.ndarray | None] | None = None, ncols: int = 6) -> bytes | None:
    from defectscope.evaluation import plots

    keep = [j for j, i in enumerate(indices) if thumbs(int(i)) is not None]
    if not keep:
        return None
    fig = plots.image_grid([thumbs(int(indices[j])) for j in keep], [captions[j] for j in keep],
                           overlays=None if overlays is None else [overlays[j] for j in keep], ncols=ncols,
                           title=title)
    return plots.save(fig, path)


# A Grad-CAM map is min-max scaled per image; one whose maximum stays below this had no positive evidence at all
# (grad-cam returns zeros), which reads as a plain blue tile and needs saying in words.
FLAT_MAP = 0.05


def gradcam_section(
    model: Any, probs: np.ndarray, y_true: np.ndarray, classes: Sequence[str], thumbs: Thumbs,
    mistakes: np.ndarray, per_class: int, plots_dir: Path,
) -> tuple[str, dict[str, Any]]:
    """HTML and a summary dict; any failure of Grad-CAM becomes a note, never an exception."""
    from defectscope.evaluation.gradcam import gradcam_maps, target_layer

    info: dict[str, Any] = {"layer": None, "images": 0, "error": None}
    if model is None:
        return '<p class="note">No model was given, so no Grad-CAM heatmaps.</p>', info
    try:
        layer, layer_name = target_layer(model)
        info["layer"] = layer_name
        # Per class: the images the model is surest of, explaining that class. Mistakes: why it chose wrong.
        per = [i for k in range(len(classes)) for i in
               np.nonzero(y_true == k)[0][np.argsort(-probs[y_true == k, k], kind="stable")][:per_class]]
        body = [f"<p>Layer used: <code>{esc(layer_name)}</code> (the last convolution of the backbone). Warm "
                f"colours mark the regions that pushed the model towards the named class. A plain blue tile (captioned "
                f"<i>no region stands out</i>) means no region pushed it that way: for a good class that is the "
                f"expected answer, nothing in the image looked like a defect, so the evidence is an absence.</p>"]
        for what, idx in (("classes", per), ("mistakes", list(mistakes))):
            idx = [int(i) for i in idx if thumbs(int(i)) is not None]
            if not idx:
                continue
            targets = [int(y_true[i]) for i in idx] if what == "classes" else [int(probs[i].argmax()) for i in idx]
            maps = gradcam_maps(model, np.stack([thumbs(i) for i in idx]), targets, layer=layer)
            info["images"] += len(idx)
            flat = ["\n(no region stands out)" if float(m.max()) < FLAT_MAP else "" for m in maps]
            if what == "classes":
                captions = [f"{classes[t]} p={probs[i, t]:.2f}{f}" for i, t, f in zip(idx, targets, flat, strict=True)]
                title, ncols = "Grad-CAM towards the true class", max(per_class, 1) * max(1, 6 // max(per_class, 1))
            else:
                captions = [f"true {classes[y_true[i]]}\n-> {classes[t]} p={probs[i, t]:.2f}{f}"
                            for i, t, f in zip(idx, targets, flat, strict=True)]
                title, ncols = "Grad-CAM of the most confident mistakes, towards the predicted class", 6
            png = grid(idx, thumbs, captions, plots_dir / f"gradcam_{what}.png", title, overlays=list(maps),
                        ncols=ncols)
            if png:
                body.append(f"<h3>{esc(title)}</h3>{img(png, title)}")
        return "\n".join(body), info
    except Exception as exc:  # a report without heatmaps beats no report
        info["error"] = f"{type(exc).__name__}: {exc}"
        log.warning(f"report: Grad-CAM failed ({info['error']}); the report is written without heatmaps")
        return f'<p class="note">Grad-CAM could not be computed for this model: {esc(info["error"])}</p>', info


def gallery(probs: np.ndarray, y_true: np.ndarray, classes: list[str], thumbs: Thumbs,
            plots_dir: Path) -> tuple[str, np.ndarray]:
    """The gallery section's body and the indices of the most confident mistakes (reused by Grad-CAM)."""
    mistakes, unsure = gallery_indices(probs, y_true)
    parts = []
    for what, idx, title in (("mistakes", mistakes, "most confident mistakes"),
                             ("unsure_correct", unsure, "least confident correct predictions")):
        captions = [f"true {classes[y_true[i]]}\npred {classes[probs[i].argmax()]} p={probs[i].max():.2f}"
                    for i in idx]
        png = grid(list(idx), thumbs, captions, plots_dir / f"gallery_{what}.png", title) if len(idx) else None
        parts.append(f"<h3>{esc(title)} ({len(idx)})</h3>" + (img(png, title) if png else "<p>none</p>"))
    return "\n".join(parts), mistakes
