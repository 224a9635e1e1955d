"""Data layer shared by diffusion and GANs: files -> validated rows -> splits -> tensors."""

from .augment import diff_augment
from .constants import COLOR_NAMES, TYPE_NAMES, primary_type_id
from .dataset import (
    SPLIT_NAMES,
    BadDataError,
    SpriteDataset,
    build_dataloader,
    collate_sprites,
    load_splits,
    load_sprite_dataset,
    open_image,
    split_assignment,
    split_dataset,
)
from .stats import data_stats, print_data_stats
from .text import drop_captions, tokenize_captions
from .transforms import (
    SpriteTransform,
    alpha_bbox,
    composite_on_background,
    pad_to_square_and_resize,
    to_tensor_minus1_1,
    trim_to_alpha,
)
