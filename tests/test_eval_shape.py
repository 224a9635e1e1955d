"""Shape agreement: the grouping of PokéAPI shapes, the prompt parser, the judge fitted on the train split, and the
runner's shape metrics (a replaying sampler whose samples are the real sprites reaches the judge's ceiling)."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from pokediff.config import DataConfig
from pokediff.data import load_splits
from pokediff.data.captions import SHAPE_PHRASES, caption_variants
from pokediff.eval import METRIC_KEYS, PixelFeatures, validate_result
from pokediff.eval.prompts import FREEFORM_PROMPTS, FREEFORM_SHAPE_PROMPTS
from pokediff.eval.reference_stats import real_image_batches
from pokediff.eval.runner import EvalSettings, _freeform_shapes, _shape_judge, evaluate
from pokediff.eval.shape import (
    GROUP_OF_SHAPE,
    SHAPE_GROUP_NAMES,
    SHAPE_GROUPS,
    shape_agreement,
    shape_agreement_from_predictions,
    shape_group,
    shape_in_text,
    shape_judge_for,
    silhouette_features,
    target_shape,
)

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "pokemon" / "metadata.csv"
POKEAPI_SHAPES = {
    "quadruped",
    "upright",
    "wings",
    "fish",
    "armor",
    "arms",
    "blob",
    "bug-wings",
    "heads",
    "humanoid",
    "legs",
    "squiggle",
    "tentacles",
    "ball",
}


def bundled_rows() -> list[dict]:
    with open(BUNDLED, newline="") as f:
        return list(csv.DictReader(f))


def _labels(split) -> list:
    return [target_shape(row, row["text"]) for row in split.remove_columns("image").to_list()]


# ------------------------------------------------------------------------------------- groups and words
def test_the_groups_cover_each_pokeapi_shape_once():
    grouped = [shape for shapes in SHAPE_GROUPS.values() for shape in shapes]
    assert sorted(grouped) == sorted(POKEAPI_SHAPES) == sorted(SHAPE_PHRASES)
    assert {row["shape"] for row in bundled_rows()} == POKEAPI_SHAPES
    assert shape_group("Quadruped ") == "four-legged" and shape_group("") is None and shape_group("robot") is None
    assert set(GROUP_OF_SHAPE.values()) == set(SHAPE_GROUP_NAMES)


def test_every_bundled_caption_and_caption_variant_names_its_rows_shape():
    for row in bundled_rows():
        group = GROUP_OF_SHAPE[row["shape"]]
        assert shape_in_text(row["text"]) == group, row["text"]
        for variant in caption_variants(row, row["text"]):
            if SHAPE_PHRASES[row["shape"]] in variant:  # others may name a genus ("worm") or flavour-text wings
                assert shape_in_text(variant) == group, variant
        assert target_shape(row, "") == group
    # without a shape column the caption decides
    assert target_shape({}, "A blue water type Pokémon with a fish-like body and fins.") == "serpentine"


@pytest.mark.parametrize(
    "prompt, group",
    [
        ("a blue bird with wings", "winged"),
        ("a four-legged fire creature", "four-legged"),
        ("a small FISH", "serpentine"),
        ("a purple snake coiled up", "serpentine"),
        ("a red lizard that stands on two legs", "two-legged"),
        ("a humanoid psychic fox", "two-legged"),
        ("a pink blob", "round"),
        ("a creature with tentacles or many legs", "serpentine"),  # the bundled tentacles phrase, not "many legs"
        ("a creature with arms and no legs", "round"),
        ("a red fire type Pokémon", None),
        ("a round pink balloon creature that sings", None),  # round cheeks, a round face: not a body shape
        ("", None),
    ],
)
def test_shape_words_in_prompts(prompt, group):
    assert shape_in_text(prompt) == group


def test_free_form_shape_prompts_name_their_target_and_are_not_training_captions():
    assert {group for _, group in FREEFORM_SHAPE_PROMPTS} == set(SHAPE_GROUP_NAMES)
    for prompt, group in FREEFORM_SHAPE_PROMPTS:
        assert shape_in_text(prompt) == group, prompt
    captions = {c.lower() for row in bundled_rows() for c in caption_variants(row, row["text"])}
    prompts = [p for p, _ in FREEFORM_SHAPE_PROMPTS]
    assert not captions & {p.lower() for p in prompts}
    assert len(set(prompts)) == len(prompts) and not set(prompts) & {p for p, _ in FREEFORM_PROMPTS}


def test_agreement_counts_and_errors():
    result = shape_agreement_from_predictions(["winged", "round", None, "round"], ["winged", "winged", "round", None])
    assert result["accuracy"] == pytest.approx(1 / 3) and result["num_scored"] == 3
    assert result["confusion"] == {"round": {"none": 1}, "winged": {"winged": 1, "round": 1}}
    assert shape_agreement_from_predictions(["round"], [None])["accuracy"] is None
    with pytest.raises(ValueError, match="unknown shape groups"):
        shape_agreement_from_predictions(["round"], ["quadruped"])
    with pytest.raises(ValueError, match="target shapes"):
        shape_agreement_from_predictions(["round"], [])


# ------------------------------------------------------------------------------------------ the judge
@pytest.fixture(scope="module")
def tiny_splits(tiny_data_root):
    cfg = DataConfig(root=str(tiny_data_root), resolution=64, augment=False)
    return cfg, load_splits(cfg)


def test_the_judge_learns_its_training_sprites_the_same_way_each_time(tiny_splits, tmp_path):
    cfg, splits = tiny_splits
    train, labels = splits["train"], _labels(splits["train"])
    images = torch.cat(list(real_image_batches(train, cfg, 8)))
    judge = shape_judge_for(train, cfg, labels, cache_dir=tmp_path / "a")
    assert not judge.cached and judge.path.is_file() and set(judge.groups) == set(labels)
    predicted = judge.predict(images, cfg.background)
    accuracy = np.mean([p == t for p, t in zip(predicted, labels)])
    majority = max(labels.count(g) for g in set(labels)) / len(labels)
    assert accuracy > majority and judge.majority == max(set(labels), key=labels.count)
    assert shape_agreement(images, labels, judge, cfg.background)["accuracy"] == pytest.approx(accuracy)

    again = shape_judge_for(train, cfg, labels, cache_dir=tmp_path / "b")  # fitted afresh: no random step
    np.testing.assert_array_equal(again.weights, judge.weights)
    cached = shape_judge_for(train, cfg, labels, cache_dir=tmp_path / "a")
    assert cached.cached and cached.key == judge.key and cached.groups == judge.groups
    assert cached.predict(images, cfg.background) == predicted == again.predict(images, cfg.background)
    # the cache key follows the labels: another grouping is another judge
    other = shape_judge_for(train, cfg, ["round" if i % 2 else "winged" for i in range(len(train))], tmp_path / "a")
    assert other.key != judge.key and not other.cached


def test_the_judge_reads_tensors_with_alpha_and_skips_empty_sprites(tiny_splits, tmp_path):
    cfg, splits = tiny_splits
    judge = shape_judge_for(splits["train"], cfg, _labels(splits["train"]), cache_dir=tmp_path)
    assert judge.predict([torch.ones(3, 32, 32), torch.zeros(4, 32, 32)]) == [None, None]
    disc = torch.zeros(4, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc[3] = ((yy - 16) ** 2 + (xx - 16) ** 2 < 100).float()
    assert judge.predict([disc])[0] in judge.groups
    pair = silhouette_features(disc)
    assert pair.shape[0] == 2 and np.isfinite(pair).all()


# ------------------------------------------------------------------------------------------ the runner
class ReplaySampler:
    """A text-conditional stand-in whose sample for a val caption is that caption's real sprite (a dark disc for
    any other prompt): its shape agreement must equal the judge's ceiling on the real sprites."""

    kind = "diffusion"
    text_conditional = True
    vae = None
    background = [255, 255, 255]
    resolution = 64
    path = Path("replay")

    def __init__(self, real: dict):
        self.real = real

    def config_hash(self) -> str:
        return "replay"

    def describe(self) -> dict:
        return {"replay": len(self.real)}

    def sample(self, prompts, type_names=None, seed=0, batch_size=16, progress=False, desc=""):
        disc = torch.ones(3, 64, 64)
        yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
        disc[:, (yy - 32) ** 2 + (xx - 32) ** 2 < 400] = 0.2
        for start in range(0, len(prompts), batch_size):
            yield torch.stack([self.real.get(p, disc) for p in prompts[start : start + batch_size]])


def test_the_runner_reports_shape_agreement_with_its_ceiling_and_floor(tiny_splits, tiny_data_root, tmp_path):
    cfg, splits = tiny_splits
    val = splits["val"]
    images = torch.cat(list(real_image_batches(val, cfg, 8)))
    sampler = ReplaySampler({str(c): im for c, im in zip(val["text"], images)})
    settings = EvalSettings(
        num=len(val),  # each val row once: the samples are exactly the real sprites
        batch_size=4,
        kid_subsets=2,
        diversity_samples=0,
        freeform_samples=1,
        recon_num=0,
        clip="none",
        memorization=False,
        cache_dir=str(tmp_path / "cache"),
    )
    result, _ = evaluate(
        None,
        settings,
        {"root": str(tiny_data_root)},
        "cpu",
        feature_net=PixelFeatures(),
        progress=False,
        sampler=sampler,
    )
    validate_result(result)
    m = result["metrics"]
    assert {"shape_agreement", "shape_agreement_real", "shape_agreement_freeform", "shape_agreement_majority"} <= set(
        METRIC_KEYS
    )
    for key in ("shape_agreement", "shape_agreement_real", "shape_agreement_freeform", "shape_agreement_majority"):
        assert 0 <= m[key] <= 1, (key, result["skipped"].get(key))
    assert m["shape_agreement"] == pytest.approx(m["shape_agreement_real"])
    judge = result["shape_judge"]
    targets = _labels(val)
    assert m["shape_agreement_majority"] == pytest.approx(targets.count(judge["majority"]) / len(targets))
    assert set(judge["confusion"]) == {"samples", "real", "freeform"}
    assert sum(sum(c.values()) for c in judge["confusion"]["freeform"].values()) == len(FREEFORM_SHAPE_PROMPTS)
    assert judge["train_counts"] == {g: _labels(splits["train"]).count(g) for g in set(_labels(splits["train"]))}
    assert Path(judge["cache_file"]).is_file()


class TypeOnlyGan:
    kind = "gan"
    text_conditional = False
    type_conditional = True


def test_models_without_text_and_saved_samples_say_why_shapes_are_skipped():
    judge, reason = _shape_judge(EvalSettings(), TypeOnlyGan(), None, None)
    assert judge is None and "not conditioned on captions" in reason and "primary type only" in reason
    assert _freeform_shapes(TypeOnlyGan(), EvalSettings(), None, reason, False) == (
        {},
        {"shape_agreement_freeform": reason},
        None,
    )
    off = _freeform_shapes(ReplaySampler({}), EvalSettings(freeform_samples=0), object(), None, False)
    assert off == ({}, {"shape_agreement_freeform": "turned off (--freeform-samples 0)"}, None)


def test_saved_samples_take_their_rows_shape_else_the_one_their_prompt_names():
    from pokediff.eval.runner import _shape_targets, _SplitRows
    from pokediff.eval.sampling import SavedSamples

    table = _SplitRows(["c0", "c1"], [None, None], [None, None], ["four-legged", "winged"])
    saved = object.__new__(SavedSamples)  # only its manifest records matter here
    saved.records = [
        {"source": "val", "row": 1, "prompt": "a blue fish"},  # a val row: the metadata's shape wins
        {"source": "freeform", "row": None, "prompt": "a blue fish"},
        {"source": "freeform", "row": None, "prompt": "a red fire type Pokémon"},
        {"source": "val", "row": 7, "prompt": "a pink blob"},  # a row this split does not have: the words decide
    ]
    assert _shape_targets(saved, table, "val", [1]) == ["winged", "serpentine", None, "round"]
    assert _shape_targets(ReplaySampler({}), table, "val", [1, 0, 1]) == ["winged", "four-legged", "winged"]
