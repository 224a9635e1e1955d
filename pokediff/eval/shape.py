"""Shape agreement: does a sample have the body shape its prompt names? Judged, like colour, without a pretrained
network: a small classifier of the sprite's outline, fitted on the training split only.

The metadata's ``shape`` column holds PokéAPI's 14 body shapes; a 64-px sprite cannot tell most of them apart
(upright and humanoid are the same two-legged outline; bug-wings has 19 training sprites), so they are grouped
into ``SHAPE_GROUPS``: four-legged, two-legged, winged, serpentine (long, finned or tentacled, no legs) and round
(compact bodies without legs: balls, blobs, several heads, armoured crawlers, heads with arms).

The judge: the sprite mask (``pokediff.eval.color.sprite_mask``, the colour judge's foreground), cropped to its
bounding box, described by outline statistics (aspect, fill, moments, width profiles, leg-like runs along the
bottom rows) and a histogram of oriented gradients of the sprite's darkness inside the mask (the outlines drawn
inside the silhouette show where legs and wings are), then a multinomial logistic regression. Fitting has no
random step (zero-initialised full-batch L-BFGS on every training sprite and its mirror image), so it gives the
same weights each time; a fitted judge is cached under the eval cache folder, keyed by the training images and
labels. Its accuracy on the real held-out sprites (``shape_agreement_real``) is the ceiling a model's samples
can reach; ``shape_agreement_majority`` is what always answering the training split's commonest group scores.
On the bundled data it is a weak judge: 0.51 on the 136 val sprites at 64 px against 0.44 for the majority
(two-legged), 0.46 against 0.30 on test; read sample agreement between those two numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage, optimize

from pokediff.models.shape_classifier import (  # noqa: F401 - the groups and prompt rules, re-exported
    GROUP_OF_SHAPE,
    SHAPE_GROUP_NAMES,
    SHAPE_GROUPS,
    shape_group,
    shape_in_text,
)

from .color import _as_array, sprite_mask

logger = logging.getLogger(__name__)


def target_shape(row: dict, caption: str) -> str | None:
    """The shape group a prompt asks for: the metadata row's shape when it is a PokéAPI one, else the caption's."""
    return shape_group(row.get("shape")) or shape_in_text(caption)


# ------------------------------------------------------------------------------------------ features
CROP_SIZE = 48  # the sprite's bounding box, padded square, is resized to this before the gradient histogram
HOG_CELLS = 8  # cells per side
HOG_BINS = 9  # unsigned orientations
PROFILE_BINS = 16
_LEG_ROWS = (0.8, 0.88, 0.95)  # fractions of the sprite's height where separate runs of pixels count legs
_BODY_COLUMNS = (0.2, 0.5, 0.8)


def _crop_square(values: np.ndarray, box: tuple[slice, slice], size: int) -> np.ndarray:
    """``values`` cut to ``box``, centred on a zero square and box-resized to ``size`` x ``size``."""
    part = values[box].astype(np.float32)
    h, w = part.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = part
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BOX))


def _gradient_histogram(values: np.ndarray) -> np.ndarray:
    """Per-cell histograms of gradient orientation weighted by magnitude, each L2-normalised (a plain HOG)."""
    gy, gx = np.gradient(values)
    magnitude = np.hypot(gx, gy)
    bins = np.minimum(((np.arctan2(gy, gx) % np.pi) / np.pi * HOG_BINS).astype(int), HOG_BINS - 1)
    cells = []
    for rows in np.array_split(np.arange(values.shape[0]), HOG_CELLS):
        for cols in np.array_split(np.arange(values.shape[1]), HOG_CELLS):
            cell = np.ix_(rows, cols)
            hist = np.bincount(bins[cell].ravel(), weights=magnitude[cell].ravel(), minlength=HOG_BINS)
            cells.append(hist / (np.linalg.norm(hist) + 1e-6))
    return np.concatenate(cells)


def _runs(line: np.ndarray) -> int:
    """Separate stretches of sprite pixels along a row or column."""
    return int(np.count_nonzero(np.diff(np.concatenate([[0], line.astype(np.int8)])) == 1))


def _outline_statistics(mask: np.ndarray) -> np.ndarray:
    """Aspect, fill, holes, compactness, parts, second and third moments, width/height profiles, leg runs."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = box.shape
    area = len(ys)
    scale = max(h, w)
    y, x = (ys - ys.mean()) / scale, (xs - xs.mean()) / scale
    mu20, mu02, mu11 = (x * x).mean(), (y * y).mean(), (x * y).mean()
    perimeter = np.count_nonzero(mask & ~ndimage.binary_erosion(mask))
    stats = [
        np.log(h / w),
        area / (h * w),
        ndimage.binary_fill_holes(mask).sum() / area,
        perimeter / np.sqrt(area),
        np.log(ndimage.label(mask)[1]),
        mu20,
        mu02,
        abs(mu11),
        np.sqrt((mu20 - mu02) ** 2 + 4 * mu11**2) / (mu20 + mu02 + 1e-9),
        (y**3).mean() / (mu02**1.5 + 1e-9),
        abs((x**3).mean()) / (mu20**1.5 + 1e-9),
        (ys.mean() - ys.min()) / h,
    ]
    rows = [part.mean() for part in np.array_split(box.mean(axis=1), PROFILE_BINS)]
    cols = [part.mean() for part in np.array_split(box.mean(axis=0), PROFILE_BINS)]
    legs = [_runs(box[min(h - 1, int(f * h))]) for f in _LEG_ROWS]
    body = [_runs(box[:, min(w - 1, int(f * w))]) for f in _BODY_COLUMNS]
    return np.array(stats + rows + cols + legs + body, dtype=np.float64)


def _features(mask: np.ndarray, darkness: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    hog = _gradient_histogram(_crop_square(darkness, box, CROP_SIZE))
    return np.concatenate([_outline_statistics(mask), hog])


def silhouette_features(image, background: Sequence[int] = (255, 255, 255)) -> np.ndarray | None:
    """(2, D) features of a sprite and of its mirror image, or None for an empty sprite. ``image``: a PIL image,
    a (3|4, H, W) tensor in [0, 1] or an HWC array, on ``background`` unless it has alpha."""
    array = _as_array(image)
    mask = sprite_mask(array, background)
    if not mask.any():
        return None
    darkness = (1.0 - array[..., :3].mean(axis=2)) * mask
    return np.stack([_features(mask, darkness), _features(mask[:, ::-1], darkness[:, ::-1])])


# ------------------------------------------------------------------------------------------ the judge
JUDGE_VERSION = "shape-judge-v1"  # bump when the features or the fit change: cached judges are then refitted
L2_PENALTY = 0.1  # chosen by 5-fold cross-validation on the train split (0.03 / 0.1 / 0.3)


@dataclass(eq=False)
class ShapeJudge:
    """A fitted body-shape classifier: standardised features -> logits over ``groups``."""

    groups: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # (D, K)
    bias: np.ndarray  # (K,)
    train_counts: dict  # group -> training sprites
    key: str = ""
    path: Path | None = None
    cached: bool = False

    @property
    def majority(self) -> str:
        """The training split's commonest group: the answer of a judge that never looks."""
        return max(self.groups, key=lambda g: (self.train_counts.get(g, 0), -self.groups.index(g)))

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std) @ self.weights + self.bias

    def predict(self, images, background: Sequence[int] = (255, 255, 255)) -> list[str | None]:
        """Each image's shape group (logits of the sprite and its mirror image summed), None for an empty one."""
        out = []
        for image in images:
            pair = silhouette_features(image, background)
            out.append(None if pair is None else self.groups[int(self.logits(pair).sum(axis=0).argmax())])
        return out

    def describe(self) -> dict:
        return {
            "version": JUDGE_VERSION,
            "groups": {g: list(SHAPE_GROUPS.get(g, ())) for g in self.groups},
            "train_counts": dict(self.train_counts),
            "majority": self.majority,
            "key": self.key,
            "cache_file": str(self.path) if self.path else None,
            "cached": self.cached,
        }


def fit_shape_judge(features: Sequence[np.ndarray | None], labels: Sequence[str | None], l2: float = L2_PENALTY):
    """A ``ShapeJudge`` fitted on ``silhouette_features`` pairs and their groups; sprites without a group or without
    pixels are left out. Needs two groups at least (ValueError otherwise)."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature pairs but {len(labels)} labels")
    kept = [(f, label) for f, label in zip(features, labels) if f is not None and label is not None]
    unknown = {label for _, label in kept if label not in SHAPE_GROUPS}
    if unknown:
        raise ValueError(f"unknown shape groups {sorted(unknown)}; expected one of {SHAPE_GROUP_NAMES}")
    counts = Counter(label for _, label in kept)
    if len(counts) < 2:
        raise ValueError(f"the shape judge needs sprites of two body-shape groups at least, got {dict(counts)}")
    groups = tuple(g for g in SHAPE_GROUP_NAMES if g in counts)
    x = np.concatenate([f for f, _ in kept]).astype(np.float64)  # every sprite and its mirror image
    y = np.repeat([groups.index(label) for _, label in kept], 2)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    x = (x - mean) / std
    n, dim, k = len(x), x.shape[1], len(groups)
    onehot = np.eye(k)[y]

    def loss_and_grad(theta):
        w, b = theta[: dim * k].reshape(dim, k), theta[dim * k :]
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        residual = (np.exp(log_p) - onehot) / n
        loss = -(log_p * onehot).sum() / n + 0.5 * l2 * (w * w).sum()
        return loss, np.concatenate([(x.T @ residual + l2 * w).ravel(), residual.sum(axis=0)])

    fit = optimize.minimize(loss_and_grad, np.zeros(dim * k + k), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return ShapeJudge(groups, mean, std, fit.x[: dim * k].reshape(dim, k), fit.x[dim * k :], dict(counts))


def _save(judge: ShapeJudge, path: Path) -> None:
    from safetensors.numpy import save_file

    from pokediff.fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"mean": judge.mean, "std": judge.std, "weights": judge.weights, "bias": judge.bias}
    metadata = {"version": JUDGE_VERSION, "groups": json.dumps(judge.groups), "counts": json.dumps(judge.train_counts)}
    with atomic_write(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _load(path: Path) -> ShapeJudge | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in ("mean", "std", "weights", "bias")}
        return ShapeJudge(tuple(json.loads(meta["groups"])), train_counts=json.loads(meta["counts"]), **arrays)
    except (SafetensorError, OSError, KeyError, ValueError) as err:  # a cache: rebuild it
        logger.warning("shape judge cache %s is unreadable (%s): fitting it again", path, err)
        return None


def shape_judge_for(train_split, data_cfg, labels: Sequence[str | None], cache_dir=None, batch_size: int = 50):
    """The judge fitted on ``train_split``'s images (as the eval sees real sprites: ``data_cfg``'s resolution and
    background) and their groups ``labels``; read from ``cache_dir`` when the images and labels match."""
    from .reference_stats import dataset_fingerprint, default_cache_dir, real_image_batches

    if len(labels) != len(train_split):
        raise ValueError(f"{len(labels)} labels for {len(train_split)} training images")
    fingerprint = dataset_fingerprint(train_split, data_cfg, "train", JUDGE_VERSION)
    key = hashlib.sha256(f"{fingerprint}:{json.dumps(list(labels))}:{L2_PENALTY}".encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"shape-judge-{key}.safetensors"
    judge = _load(path) if path.is_file() else None
    if judge is not None:
        judge.key, judge.path, judge.cached = key, path, True
        return judge
    features = []
    for batch in real_image_batches(train_split, data_cfg, batch_size):
        features.extend(silhouette_features(image, data_cfg.background) for image in batch)
    judge = fit_shape_judge(features, labels)
    _save(judge, path)
    judge.key, judge.path = key, path
    return judge


# ------------------------------------------------------------------------------------------ agreement
def shape_agreement_from_predictions(predicted: Sequence[str | None], targets: Sequence[str | None]) -> dict:
    """Fraction of predicted groups equal to the target group (entries without a target are skipped):
    {"accuracy" (None when nothing had a target), "num_scored", "confusion": {target: {predicted: count}}}."""
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predictions but {len(targets)} target shapes")
    unknown = {t for t in targets if t is not None and t not in SHAPE_GROUPS}
    if unknown:
        raise ValueError(f"unknown shape groups {sorted(unknown)}; expected one of {SHAPE_GROUP_NAMES}")
    scored = [(guess, target) for guess, target in zip(predicted, targets) if target is not None]
    confusion: dict[str, Counter] = {}
    for guess, target in scored:
        confusion.setdefault(target, Counter())[guess or "none"] += 1
    return {
        "accuracy": sum(g == t for g, t in scored) / len(scored) if scored else None,
        "num_scored": len(scored),
        "confusion": {t: dict(c) for t, c in sorted(confusion.items())},
    }


def balanced_accuracy(confusion: dict) -> float | None:
    """Mean over target groups of the share predicted right (from a ``{target: {predicted: count}}`` table)."""
    recalls = [row.get(target, 0) / sum(row.values()) for target, row in confusion.items() if sum(row.values())]
    return sum(recalls) / len(recalls) if recalls else None


def shape_agreement(
    images, targets: Sequence[str | None], judge: ShapeJudge, background: Sequence[int] = (255, 255, 255)
) -> dict:
    """``shape_agreement_from_predictions`` of the judge's groups for ``images`` (see there for the result)."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} target shapes")
    if isinstance(images, torch.Tensor):
        images = list(images)
    predicted = [judge.predict([im], background)[0] if t is not None else None for im, t in zip(images, targets)]
    return shape_agreement_from_predictions(predicted, targets)
