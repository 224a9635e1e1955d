"""Stage 3, method ``shape_guidance``: fit the body-shape classifier the pipeline guides with.

Stage 2's U-Net reads colour from the text and takes body shape from the noise seed. Reward fine-tuning of its
text cross-attention (``stage3_reward``) never moved shape (README, "Stage 3, measured"). This method leaves the
U-Net as it is and steers each sample at sampling time instead: a small CNN
(:class:`~pokediff.models.shape_classifier.SpriteShapeClassifier`) is fitted on the training sprites' body-shape
groups, and the pipeline moves the sampler's clean-latent estimate up its gradient for the group the prompt names
(``PokeSpritePipeline.guide_shape``). What the classifier learns is not what the gate judges with: the gate's shape
judge is the eval's outline statistics and gradient histogram under a logistic regression, and the gate also asks
that colour not fall and KID rise by at most ``stage3.gate_max_kid_increase``. Both are fitted on the same training
labels, so read a gain as "the silhouettes moved towards what the training sprites of that shape look like".
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from pokediff.config import ConfigError
from pokediff.data import load_splits
from pokediff.eval.reference_stats import real_image_batches
from pokediff.eval.shape import balanced_accuracy, shape_agreement_from_predictions, target_shape
from pokediff.fileio import write_text_atomic
from pokediff.hub import write_model_card
from pokediff.models.shape_classifier import SHAPE_GROUP_NAMES, SpriteShapeClassifier
from pokediff.models.text import load_text_encoder
from pokediff.models.vae import SpriteVAE
from pokediff.training.checkpoints import atomic_save_pretrained
from pokediff.training.setup import build_accelerator, start_stage
from pokediff.training.stage2_unet import assemble_pipeline
from pokediff.training.stage3_reward import METRICS_FILE, check_stage_weights

logger = logging.getLogger(__name__)
STAGE = "stage3"
CLASSIFIER_DIRNAME = "shape_classifier"


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random mirror, scale (±15 %) and shift (±10 % of the side) of (N, 3, H, W) sprites in [0, 1] on white:
    the body shape survives all three."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.3
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) - 0.5) * 0.2
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample 1 - image with zero padding: what comes in from outside the frame is background white
    return 1 - F.grid_sample(1 - images, grid, align_corners=False, padding_mode="zeros")


def fit_shape_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    background=(255, 255, 255),
    epochs: int = 80,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SpriteShapeClassifier, dict]:
    """A ``SpriteShapeClassifier`` fitted on (N, 3, H, W) images in [0, 1] and their group indices (into
    ``SHAPE_GROUP_NAMES``), and its val accuracy beside the commonest group's. Each group is weighted by the inverse
    of its share (the gate scores shape by balanced accuracy); labels are smoothed by 0.1 against over-confidence
    on 725 sprites."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    groups = len(SHAPE_GROUP_NAMES)
    counts = torch.bincount(train_labels, minlength=groups).float()
    weight = counts.sum() / (groups * counts.clamp(min=1))
    model = SpriteShapeClassifier(background=tuple(background))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    model.train()
    losses = []
    for _ in tqdm(range(epochs), desc="stage 3: fitting the shape classifier", disable=not progress, leave=False):
        order = torch.randperm(len(train_labels), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            logits = model(augment(train_images[rows], generator))
            loss = F.cross_entropy(logits, train_labels[rows], weight=weight, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    with torch.no_grad():
        predicted = torch.cat([model(val_images[i : i + 64]).argmax(1) for i in range(0, len(val_images), 64)])
    commonest = int(counts.argmax())
    metrics = {
        "val_accuracy": float((predicted == val_labels).float().mean()),
        "val_balanced_accuracy": balanced_accuracy(
            shape_agreement_from_predictions(
                [SHAPE_GROUP_NAMES[i] for i in predicted], [SHAPE_GROUP_NAMES[i] for i in val_labels]
            )["confusion"]
        ),
        "val_majority_accuracy": float((val_labels == commonest).float().mean()),
        "val_n": len(val_labels),
        "train_n": len(train_labels),
        "train_loss_last_epoch": sum(losses[-steps_per_epoch:]) / steps_per_epoch,
        "epochs": epochs,
    }
    return model, metrics


def labelled_images(cfg, split) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], group indices) of the rows of ``split`` whose body shape is known."""
    records = split.remove_columns(cfg.data.image_column).to_list()
    groups = [target_shape(row, str(row[cfg.data.caption_column])) for row in records]
    images = torch.cat(list(real_image_batches(split, cfg.data)))
    keep = [i for i, g in enumerate(groups) if g is not None]
    return images[keep], torch.tensor([SHAPE_GROUP_NAMES.index(groups[i]) for i in keep])


def train_shape_guidance(cfg, vae_path, unet_path, accelerator=None) -> Path:
    """Fit the shape classifier; write ``<run>/shape_classifier``, ``<run>/pipeline`` (stage 2's U-Net with the
    classifier and ``stage3.shape_guidance_scale``) and ``<run>/stage3_metrics.json``. ``stage3_gate`` then draws
    the same captions and seeds with and without shape guidance and keeps it only if the judges say it helps."""
    s3 = cfg.stage3
    if not s3.shape_guidance_scale > 0:
        raise ConfigError(
            f"stage3.shape_guidance_scale must be > 0 for stage3.method=shape_guidance, got {s3.shape_guidance_scale}"
        )
    vae_path = check_stage_weights(vae_path, "stage-1 VAE", "--vae-checkpoint")
    unet_path = check_stage_weights(unet_path, "stage-2 U-Net", "--diffusion-checkpoint")
    accelerator = build_accelerator(cfg, accelerator)
    folder = start_stage(accelerator, cfg, STAGE)
    pipeline_dir = folder / "pipeline"
    if accelerator.is_main_process:
        splits = load_splits(cfg.data, require=("train", "val"))
        train_images, train_labels = labelled_images(cfg, splits["train"])
        val_images, val_labels = labelled_images(cfg, splits["val"])
        if len(train_labels.unique()) < 2 or len(val_labels) == 0:
            raise ConfigError(
                "stage3.method=shape_guidance needs body shapes (the metadata's `shape` or a shape phrase in the "
                f"caption) of two or more groups in train and some in val; found {len(train_labels.unique())} "
                f"group(s) in train, {len(val_labels)} labelled val rows"
            )
        classifier, metrics = fit_shape_classifier(
            train_images,
            train_labels,
            val_images,
            val_labels,
            background=cfg.data.background,
            epochs=s3.shape_classifier_epochs,
            seed=cfg.runtime.seed,
        )
        logger.info(
            "stage 3 shape classifier: val accuracy %.3f (balanced %.3f; the commonest group alone %.3f, n=%d)",
            metrics["val_accuracy"],
            metrics["val_balanced_accuracy"],
            metrics["val_majority_accuracy"],
            metrics["val_n"],
        )
        atomic_save_pretrained(classifier, folder / CLASSIFIER_DIRNAME)
        tokenizer, text_encoder = load_text_encoder(cfg.text_encoder.name)
        pipe = assemble_pipeline(
            cfg,
            SpriteVAE.from_pretrained(str(vae_path)),
            UNet2DConditionModel.from_pretrained(str(unet_path)),
            text_encoder,
            tokenizer,
            text_encoder_unchanged=True,
            shape_classifier=classifier,
            shape_guidance_scale=s3.shape_guidance_scale,
        )
        pipe.save_pretrained(pipeline_dir)
        report = {
            "method": "shape_guidance",
            "inputs": {"vae": str(vae_path.resolve()), "unet": str(unet_path.resolve())},
            "shape_classifier": metrics,
            "shape_guidance_scale": s3.shape_guidance_scale,
        }
        write_text_atomic(folder / METRICS_FILE, json.dumps(report, indent=2))
        extra = {
            "run": cfg.runtime.experiment_name,
            "stage 3 method": f"shape guidance, scale {s3.shape_guidance_scale:g} (the U-Net is stage 2's)",
            "stage 3 shape classifier": f"val accuracy {metrics['val_accuracy']:.3f}, balanced "
            f"{metrics['val_balanced_accuracy']:.3f} (the commonest group alone {metrics['val_majority_accuracy']:.3f}"
            f", n={metrics['val_n']}); {metrics['epochs']} epochs on {metrics['train_n']} training sprites",
        }
        write_model_card(pipeline_dir, stages={3: None}, extra=extra)
        logger.info("stage 3 (shape guidance) done -> %s", pipeline_dir)
    accelerator.wait_for_everyone()
    return pipeline_dir
