"""Saved samples: packed into size-capped WebP archives with a manifest, then scored by `pokediff.eval --samples`."""

import json
import tarfile

import numpy as np
import pytest
from torch import nn

from pokediff.config import DataConfig
from pokediff.data import SpriteDataset, load_splits
from pokediff.eval import METRIC_KEYS, PixelFeatures, validate_result
from pokediff.eval.__main__ import cli, main
from pokediff.eval.color import target_color
from pokediff.eval.prompts import FREEFORM_PROMPTS
from pokediff.eval.samples import MANIFEST_NAME, SampleRecord, load_samples, pack_samples, read_run_info, to_uint8


class MeanAbsDistance(nn.Module):
    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(dim=1)


@pytest.fixture(scope="module")
def real_val(tiny_data_root):
    """(uint8 images, records) of the real val sprites, each twice (as gpu_day samples val captions)."""
    cfg = DataConfig(root=str(tiny_data_root), augment=False)
    val = load_splits(cfg)["val"]
    dataset = SpriteDataset(val, cfg, train=False)
    rows = val.remove_columns(cfg.image_column).to_list()
    images, records = [], []
    for i in range(len(dataset)):
        array = to_uint8((dataset[i]["pixel_values"] + 1) / 2)
        caption = str(rows[i][cfg.caption_column])
        for k in range(2):
            images.append(array)
            records.append(
                SampleRecord(
                    file=f"val_{i:03d}_{k}.webp",
                    prompt=caption,
                    seed=2 * i + k,
                    target_color=target_color(rows[i], caption),
                    source="val",
                    row=i,
                )
            )
    # two free-form records (scored only with --sources freeform)
    for k, (prompt, color) in enumerate(FREEFORM_PROMPTS[:2]):
        images.append(images[k])
        records.append(
            SampleRecord(file=f"free_{k:03d}.webp", prompt=prompt, seed=k, target_color=color, source="freeform")
        )
    return images, records, cfg


def test_packing_is_lossless_when_it_fits_and_splits_into_archives(real_val, tmp_path):
    images, records, cfg = real_val
    summary = pack_samples(
        images, records, tmp_path, max_archives=2, max_bytes=4 << 20, run_info={"data": {"root": cfg.root}}
    )
    assert summary["encoding"] == {"format": "webp", "lossless": True, "quality": None}
    assert [a["file"] for a in summary["archives"]] == ["samples-0.tar", "samples-1.tar"]
    assert sum(a["images"] for a in summary["archives"]) == len(images)
    assert summary["max_abs_pixel_error_sampled"] == 0
    loaded = load_samples(tmp_path)
    assert [r["file"] for r, _ in loaded] == [r.file for r in records]
    for (record, image), original in zip(loaded, images):
        np.testing.assert_array_equal(np.asarray(image), original)  # bit-exact: the metrics cannot move
        assert set(record) >= {"file", "prompt", "seed", "target_color", "source", "row", "encoding"}
    # one archive alone is readable too, with its own manifest and the run info
    first = load_samples(tmp_path / "samples-0.tar")
    assert len(first) == summary["archives"][0]["images"]
    assert read_run_info(tmp_path / "samples-1.tar") == {"data": {"root": cfg.root}}


def test_packing_falls_back_to_lossy_webp_and_refuses_what_cannot_fit(real_val, tmp_path):
    images, records, _ = real_val
    budget = 160 * 1024  # too little for 8 lossless sprites (~25 KiB each)
    summary = pack_samples(images[:8], records[:8], tmp_path / "lossy", max_archives=1, max_bytes=budget)
    assert summary["encoding"]["lossless"] is False and summary["encoding"]["quality"] in (95, 90, 85, 80)
    assert 0 < summary["max_abs_pixel_error_sampled"] < 128
    assert (tmp_path / "lossy" / "samples-0.tar").stat().st_size <= budget
    with pytest.raises(RuntimeError, match=r"over the 0\.01 MiB limit even at WebP quality 80: generate fewer"):
        pack_samples(images[:8], records[:8], tmp_path / "none", max_archives=1, max_bytes=10 * 1024)
    assert not list((tmp_path / "none").iterdir())  # no half-written archive is left behind
    with pytest.raises(ValueError, match="8 images but 7 manifest records"):
        pack_samples(images[:8], records[:7], tmp_path / "bad")
    with pytest.raises(ValueError, match="the manifest names a file twice: val_000_0.webp"):
        pack_samples(images[:2], [records[0], records[0]], tmp_path / "bad")


def test_eval_samples_scores_a_folder_of_archives_like_a_model(real_val, tiny_data_root, tmp_path):
    images, records, _ = real_val
    pack_samples(images, records, tmp_path / "samples", max_archives=2, max_bytes=4 << 20)
    argv = [
        "--samples",
        str(tmp_path / "samples"),
        "--split",
        "val",
        "--data-root",
        str(tiny_data_root),
        "--batch-size",
        "4",
        "--diversity-prompts",
        "2",
        "--diversity-samples",
        "2",
        "--clip",
        "none",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / "s.json"),
        "--quiet",
    ]
    result = main(argv, feature_net=PixelFeatures(), perceptual=MeanAbsDistance())
    validate_result(result)
    assert json.loads((tmp_path / "s.json").read_text()) == result
    assert set(result["metrics"]) == set(METRIC_KEYS)
    assert result["model"]["kind"] == "samples" and result["model"]["details"]["sources"] == ["val"]
    assert result["num_samples"] == len(images) - 2  # the free-form records are not val samples
    m = result["metrics"]
    # the "samples" are the real val sprites: colour agreement equals the real ceiling, FID is ~0 (KID on a
    # handful of images is too noisy to say more than that it is there), two copies of a sprite have no diversity
    assert m["color_agreement"] == pytest.approx(m["color_agreement_real"])
    assert m["fid"] < 1e-2 and m["kid_mean"] is not None
    assert m["diversity"] == 0.0 and m["diversity_real_dataset"] > 0
    assert m["recon_l1"] is None and "without their model" in result["skipped"]["recon_l1"]
    assert m["nn_train_similarity_mean"] is not None

    free = main(
        argv[:4] + ["--sources", "freeform"] + argv[4:], feature_net=PixelFeatures(), perceptual=MeanAbsDistance()
    )
    assert free["num_samples"] == 2 and free["model"]["details"]["sources"] == ["freeform"]


def test_eval_samples_bad_input_is_one_error_line(real_val, tmp_path, capsys):
    assert cli(["--samples", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"error: samples not found: {tmp_path / 'nowhere'}"
    images, records, _ = real_val
    pack_samples(images[:4], records[:4], tmp_path / "s", max_archives=1)
    assert cli(["--samples", str(tmp_path / "s"), "--num", "5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --num does not apply to --samples: the images are already made"
    assert cli(["--samples", str(tmp_path / "s"), "--sources", "test"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 's'} has no samples from test (it has: val)"
    with tarfile.open(tmp_path / "s" / "samples-0.tar") as tar:
        names = tar.getnames()
    assert MANIFEST_NAME in names and len(names) == 5
