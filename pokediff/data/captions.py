"""Several short captions per sprite, built from the metadata columns, so free-form prompts look like training text.

The bundled ``text`` column follows one template ("Name, the Genus Pokémon. A colour type … Pokédex entry") and
is longer than ``max_text_length``: what survives truncation is always the same frame plus a fragment unique to
the sprite. A user types "a small green creature with a bulb on its back". Training on varied short captions
(colour, types, shape, genus, a body description from the flavour text, with and without the name) and drawing
one per step teaches the model the words users type, and takes away the per-sprite key to memorise.
"""

from __future__ import annotations

import re

# the dataset's `shape` column (PokéAPI shapes) in words
SHAPE_PHRASES = {
    "upright": "standing upright on two legs",
    "quadruped": "with a four-legged body",
    "humanoid": "with a humanoid body",
    "wings": "with wings",
    "arms": "with arms and no legs",
    "ball": "with a round body",
    "fish": "with a fish-like body",
    "armor": "with an armored body",
    "blob": "with a blob-like body",
    "squiggle": "with a long serpentine body",
    "legs": "with many legs",
    "tentacles": "with tentacles",
    "bug-wings": "with insect wings",
    "heads": "with several heads",
}
# words of the flavour text that describe the body rather than behaviour or habitat
_BODY_WORDS = re.compile(
    r"\b(its|their) (back|tail|head|body|horns?|wings?|shell|leaves|leaf|flower|flame|fur|eyes?|ears?|"
    r"mouth|arms?|legs?|claws?|feathers|scales|spikes?|bulb|seed|crest|mane|fins?|jaw|beak|skin)\b",
    re.IGNORECASE,
)
_MAX_BODY_WORDS = 14


def _clean(value) -> str:
    return "" if value is None else str(value).strip()


def body_description(flavor_text: str) -> str:
    """The first flavour-text sentence that talks about the body, lower-cased and cut to a few words ("")."""
    for sentence in re.split(r"(?<=[.!?])\s+", _clean(flavor_text)):
        if _BODY_WORDS.search(sentence):
            words = sentence.rstrip(".!?").split()
            return " ".join(words[:_MAX_BODY_WORDS]).lower()
    return ""


def visual_caption(row: dict, caption: str) -> str:
    """What a picture of the sprite can show, in the words a user would type: "a {colour} {type} type pokémon
    {shape phrase}"; the dataset caption itself for a row without a colour and a type."""
    color = _clean(row.get("color")).lower()
    types = [t for t in _clean(row.get("types")).lower().split("|") if t]
    if not color or not types:
        return caption
    shape = SHAPE_PHRASES.get(_clean(row.get("shape")).lower(), "")
    return f"a {color} {types[0]} type pokémon {shape}".strip()


def caption_variants(row: dict, caption: str) -> list[str]:
    """The dataset caption plus short captions from ``name``, ``types``, ``genus``, ``color``, ``shape`` and
    ``flavor_text`` where the row has them; just ``[caption]`` for a dataset without those columns.

    Every variant that names a colour names it first, as a user would ("a red ..."), so the colour judge of
    the evaluation reads the same word the model was trained on.
    """
    color = _clean(row.get("color")).lower()
    types = [t for t in _clean(row.get("types")).lower().split("|") if t]
    if not color or not types:
        return [caption]
    name = _clean(row.get("name"))
    genus = _clean(row.get("genus")).replace("Pokémon", "").strip().lower()
    shape = SHAPE_PHRASES.get(_clean(row.get("shape")).lower(), "")
    body = body_description(row.get("flavor_text", ""))
    type_words = " and ".join(types)
    variants = [
        caption,
        f"a {color} {type_words} type creature",
        visual_caption(row, caption),
        f"a {color} creature {shape}".strip(),
        f"{name}, a {color} {type_words} type pokémon" if name else f"a {color} {type_words} type pokémon",
    ]
    if genus:
        variants.append(f"a {color} {genus} pokémon, {type_words} type")
    if body:
        variants.append(f"a {color} {types[0]} type creature; {body}")
        variants.append(f"a small {color} creature {shape}; {body}".replace("  ", " "))
    return variants
