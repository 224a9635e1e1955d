"""Free-form prompts: how a user would ask for a sprite, not how the dataset's captions read.

Each names one of ``pokediff.data.COLOR_NAMES`` (its target colour for the colour judge) and, where it fits, a
type or a body shape. None of them is a training caption (``tests/test_eval_prompts.py`` checks this), so
samples from them show whether the model generalises beyond the caption template. Every colour appears at
least twice. ``FREEFORM_SHAPE_PROMPTS`` each name a body shape instead, for the shape judge.
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

# (prompt, target body-shape group of pokediff.eval.shape.SHAPE_GROUPS): three per group, each naming the shape in
# words a user types; the shape judge scores their samples (shape_agreement_freeform)
FREEFORM_SHAPE_PROMPTS: tuple[tuple[str, str], ...] = (
    ("a four-legged fire creature with a bushy tail", "four-legged"),
    ("a brown four-legged dog with pointed ears", "four-legged"),
    ("a green lizard walking on four legs", "four-legged"),
    ("a red lizard standing upright on two legs", "two-legged"),
    ("a purple humanoid fighter with big fists", "two-legged"),
    ("a yellow bipedal mouse with long ears", "two-legged"),
    ("a blue bird with wings", "winged"),
    ("an orange dragon with large wings", "winged"),
    ("a pink butterfly with patterned wings", "winged"),
    ("a long green serpent with a forked tongue", "serpentine"),
    ("a blue fish with big fins", "serpentine"),
    ("a purple jellyfish with dangling tentacles", "serpentine"),
    ("a round pink ball-shaped creature with tiny eyes", "round"),
    ("a gray blob with a wide smile", "round"),
    ("a white spherical creature floating in the air", "round"),
)
