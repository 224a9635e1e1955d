"""Free-form prompts: how a user would ask for a sprite, not how the dataset's captions read.

Each names one of ``pokediff.data.COLOR_NAMES`` (its target colour for the colour judge) and, where it fits, a
type or a body shape. None of them is a training caption (``tests/test_eval_prompts.py`` checks this), so
samples from them show whether the model generalises beyond the caption template. Every colour appears at
least twice.
"""

from __future__ import annotations

# (prompt, target colour)
FREEFORM_PROMPTS: tuple[tuple[str, str], ...] = (
    ("a small red fire lizard with a flame on its tail", "red"),
    ("a red bird of prey with sharp talons", "red"),
    ("a chubby blue water turtle with a round shell", "blue"),
    ("a blue dragon with long fins", "blue"),
    ("a bright yellow electric mouse with round cheeks", "yellow"),
    ("a yellow fox with a lightning bolt tail", "yellow"),
    ("a green grass frog with a leaf on its head", "green"),
    ("a tall green insect with scythe arms", "green"),
    ("a pink fairy with a ribbon and big eyes", "pink"),
    ("a round pink balloon creature that sings", "pink"),
    ("a purple ghost with a wide grin", "purple"),
    ("a purple poison snake coiled up", "purple"),
    ("a brown ground mole with big claws", "brown"),
    ("a brown owl with a round face", "brown"),
    ("a gray steel robot with bolts on its arms", "gray"),
    ("a gray rock golem made of boulders", "gray"),
    ("a white ice seal with a horn", "white"),
    ("a fluffy white sheep made of clouds", "white"),
    ("a black dark cat with red eyes", "black"),
    ("a black raven with a hat-shaped head", "black"),
    ("a blue jellyfish floating with long tentacles", "blue"),
    ("a green dragon with wings and a long neck", "green"),
    ("a yellow psychic fox with a crown of fur", "yellow"),
    ("a red fighting crab with big pincers", "red"),
)
