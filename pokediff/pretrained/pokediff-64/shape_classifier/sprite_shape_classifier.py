"""SpriteShapeClassifier: which body-shape group a sprite has, read from its silhouette; and which one a prompt names.

The pipeline's shape guidance (``PokeSpritePipeline(shape_classifier=...)``) steers the sampler towards the group
the prompt names with this classifier's gradient. It is a small CNN on two maps of the image: a soft mask of the
pixels that are not the background colour (the silhouette) and the darkness inside it (the strokes drawn inside the
silhouette show legs and wings). Fitted on the training sprites by stage 3 (``pokediff.training.stage3_shape``).

The groups and the words that name them live here because the pipeline needs them to read a prompt; the eval's
shape judge (``pokediff.eval.shape``, a different model: outline statistics and a gradient histogram under a
logistic regression) reads prompts with the same rules. No pokediff imports: saved pipelines carry this file as
``shape_classifier/sprite_shape_classifier.py`` for ``trust_remote_code`` loading without pokediff.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config

# a module-level name: diffusers finds a custom component's load method on its module (see models/vae.py)
from diffusers.models.modeling_utils import ModelMixin

# PokéAPI shape -> group; the order of the groups is the classifiers' class order. A 64-px silhouette cannot tell
# most of the 14 shapes apart (upright and humanoid are the same two-legged outline; bug-wings has 19 training
# sprites), so they are grouped: four-legged, two-legged, winged, serpentine (long, finned or tentacled, no legs)
# and round (compact bodies without legs: balls, blobs, several heads, armoured crawlers, heads with arms).
SHAPE_GROUPS: dict[str, tuple[str, ...]] = {
    "four-legged": ("quadruped",),
    "two-legged": ("upright", "humanoid", "legs"),  # legs = a head on legs (Doduo, Torchic, Exeggutor)
    "winged": ("wings", "bug-wings"),
    "serpentine": ("fish", "squiggle", "tentacles"),
    "round": ("ball", "blob", "heads", "armor", "arms"),  # arms = a head with arms and no legs (Geodude, Gastly)
}
SHAPE_GROUP_NAMES = tuple(SHAPE_GROUPS)
GROUP_OF_SHAPE = {shape: group for group, shapes in SHAPE_GROUPS.items() for shape in shapes}

# the shape phrases of the bundled captions (`text`) and of pokediff.data.captions.SHAPE_PHRASES: a caption that
# has one names its sprite's shape, whatever else its Pokédex entry says about wings or legs
_CAPTION_PHRASES = {
    "with a four-legged body": "quadruped",
    "that stands upright on two legs": "upright",
    "standing upright on two legs": "upright",
    "with a humanoid, two-legged body": "humanoid",
    "with a humanoid body": "humanoid",
    "made of a head and legs": "legs",
    "with many legs": "legs",  # SHAPE_PHRASES' words for PokéAPI's "legs" (matched after "tentacles or many legs")
    "with a single pair of wings": "wings",
    "with two or more pairs of wings": "bug-wings",
    "with insect wings": "bug-wings",
    "with wings": "wings",
    "with a fish-like body": "fish",
    "with a long serpentine body": "squiggle",
    "with tentacles": "tentacles",
    "with a ball-shaped body": "ball",
    "with a round body": "ball",
    "with a blob-like body": "blob",
    "made of multiple bodies": "heads",
    "with several heads": "heads",
    "with an armored": "armor",
    "made of a head and arms": "arms",
    "with arms and no legs": "arms",
}
_CAPTION_RE = re.compile("|".join(re.escape(p) for p in sorted(_CAPTION_PHRASES, key=len, reverse=True)), re.IGNORECASE)
# words a user types, most specific first: "a winged horse" is winged, "a snake" has no legs
_FREEFORM_WORDS = (
    ("winged", r"wings?|winged|birds?|butterfl(?:y|ies)|moth|bat"),
    ("serpentine", r"fish|fins?|finned|serpent(?:ine)?|snakes?|eels?|worms?|tentacles?|jellyfish|octopus|squid"),
    ("four-legged", r"four[- ]legged|four legs|quadruped(?:al)?|on all fours"),
    ("two-legged", r"two[- ]legged|two legs|bipedal|biped|upright|humanoid"),
    ("round", r"round body|ball[- ]shaped|ball|blob(?:-like)?|spherical|orb"),
)
_FREEFORM_RES = tuple((group, re.compile(rf"\b(?:{words})\b", re.IGNORECASE)) for group, words in _FREEFORM_WORDS)


def shape_group(shape) -> str | None:
    """The group of a PokéAPI shape ("quadruped" -> "four-legged"), None for an empty or unknown one."""
    return GROUP_OF_SHAPE.get(str(shape or "").strip().lower())


def shape_in_text(text: str) -> str | None:
    """The body-shape group a prompt names, or None: a caption's shape phrase ("with a four-legged body") first,
    else the first group whose words appear ("a blue bird with wings" -> "winged", "a snake" -> "serpentine")."""
    text = text or ""
    match = _CAPTION_RE.search(text)
    if match:
        return GROUP_OF_SHAPE[_CAPTION_PHRASES[match.group(0).lower()]]
    for group, pattern in _FREEFORM_RES:
        if pattern.search(text):
            return group
    return None


def _block(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.SiLU(),
    )


class SpriteShapeClassifier(ModelMixin, ConfigMixin):
    """Logits over ``groups`` for RGB sprites (N, 3, H, W) in [0, 1] drawn on ``background``.

    ``mask_tolerance`` / ``mask_ramp``: a pixel's mask value ramps from 0 to 1 as its largest channel distance to
    the background grows from ``mask_tolerance`` to ``mask_tolerance + mask_ramp`` (soft, so gradients reach the
    outline).
    """

    @register_to_config
    def __init__(
        self,
        groups: tuple = SHAPE_GROUP_NAMES,
        background: tuple = (255, 255, 255),
        block_out_channels: tuple = (32, 64, 128, 128),
        norm_num_groups: int = 8,
        dropout: float = 0.3,
        mask_tolerance: float = 0.03,
        mask_ramp: float = 0.1,
    ):
        super().__init__()
        unknown = [g for g in groups if g not in SHAPE_GROUPS]
        if unknown or len(set(groups)) < 2:
            raise ValueError(f"groups must be two or more of {list(SHAPE_GROUP_NAMES)}, got {list(groups)}")
        blocks, width = [], 2
        for channels in block_out_channels:
            blocks.append(_block(width, channels, norm_num_groups))
            width = channels
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, len(groups)))
        self.register_buffer("background_rgb", torch.tensor([c / 255.0 for c in background]).view(1, 3, 1, 1))

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 2, H, W): the soft silhouette and the darkness inside it."""
        images = images.float()
        distance = (images - self.background_rgb).abs().amax(dim=1, keepdim=True)
        mask = ((distance - self.config.mask_tolerance) / self.config.mask_ramp).clamp(0, 1)
        darkness = (1 - images.mean(dim=1, keepdim=True)) * mask
        return torch.cat([mask, darkness], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.maps(images).to(self.dtype)))

    def target_indices(self, prompts: list[str]) -> torch.Tensor:
        """(N,) the index of the group each prompt names, -1 where it names none this classifier knows."""
        groups = list(self.config.groups)
        named = [shape_in_text(p) for p in prompts]
        return torch.tensor([groups.index(g) if g in groups else -1 for g in named], dtype=torch.long)
