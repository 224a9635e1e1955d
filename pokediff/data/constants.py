"""Vocabulary of the bundled Pokémon metadata."""

TYPE_NAMES = sorted(
    [
        "bug",
        "dark",
        "dragon",
        "electric",
        "fairy",
        "fighting",
        "fire",
        "flying",
        "ghost",
        "grass",
        "ground",
        "ice",
        "normal",
        "poison",
        "psychic",
        "rock",
        "steel",
        "water",
    ]
)
COLOR_NAMES = ["black", "blue", "brown", "gray", "green", "pink", "purple", "red", "white", "yellow"]


def primary_type_id(types: str | None) -> int:
    """Index in TYPE_NAMES of the first of '|'-separated types, or -1 when unknown."""
    if not types:
        return -1
    first = types.split("|")[0].strip().lower()
    return TYPE_NAMES.index(first) if first in TYPE_NAMES else -1
