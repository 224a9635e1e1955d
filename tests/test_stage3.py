"""Stage 3 on tiny models (CPU): reward fine-tuning changes only the U-Net's text cross-attention K/V, the loss
falls on a fixed batch, resume is exact, and the gate keeps stage 3's U-Net only when its judges say so."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import load_benchmark, save_tiny_text_encoder, tiny_config_overrides, tiny_unet, tiny_vae

from pokediff.config import ConfigError, load_config
from pokediff.models import clip as clip_mod
from pokediff.models.clip import DomainClipTooWeakError, load_clip_scorer
from pokediff.pipeline import PokeSpritePipeline
from pokediff.schedulers import build_noise_scheduler
from pokediff.training.metrics import read_losses
from pokediff.training.stage3_reward import UNET_DIRNAME, predict_x0, train_stage3

RESOLUTION = 64  # as in test_training.py: the real 215 px geometry is exercised by the pipeline tests


def weights(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {folder}"
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def stage12(tmp_path_factory):
    """Tiny stage-1/2 weights saved with save_pretrained (untrained: stage 3 only needs the folders)."""
    root = tmp_path_factory.mktemp("stage12")
    text = save_tiny_text_encoder(root / "text")
    vae = tiny_vae()
    vae.register_to_config(sample_size=RESOLUTION, scaling_factor=0.9)
    vae.save_pretrained(root / "vae")
    tiny_unet().save_pretrained(root / "unet")
    return root, text


def make_cfg(data_root, text, out, **extra):
    overrides = tiny_config_overrides(data_root, text, out)
    overrides.update(
        {
            "data.resolution": RESOLUTION,
            "clip.source": "domain",
            "clip.min_top1_over_chance": 0.0,  # a 1-epoch tiny CLIP is not expected to beat chance
            "clip.domain_image_size": 32,
            "clip.domain_hidden_dim": 32,
            "stage2.sample_prompts": ["A red fire type Pokémon.", "A blue water type Pokémon."],
            "stage2.sample_images_per_prompt": 1,
            "stage3.learning_rate": 1e-3,
            "stage3.eval_num_prompts": 2,
            "runtime.max_steps": 2,
        }
    )
    overrides.update(extra)
    return load_config(overrides=overrides)


@pytest.fixture(scope="module")
def stage3_run(stage12, tiny_data_root, tmp_path_factory, monkeypatch_module):
    root, text = stage12
    monkeypatch_module.setattr(clip_mod, "pretrained_clip_weights", lambda model, tag: None)
    cfg = make_cfg(tiny_data_root, text, tmp_path_factory.mktemp("out"))
    before = {name: weights(root / name) for name in ("vae", "unet")}
    pipeline_dir = train_stage3(cfg, root / "vae", root / "unet")
    return cfg, pipeline_dir, before


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_stage3_changes_only_the_text_cross_attention(stage12, stage3_run):
    root, _ = stage12
    cfg, pipeline_dir, before = stage3_run
    run = pipeline_dir.parent
    assert pipeline_dir == run / "pipeline"
    for name in ("vae", "unet"):
        assert_same(weights(root / name), before[name])  # inputs untouched
    assert_same(weights(pipeline_dir / "vae"), before["vae"])
    tuned = weights(run / UNET_DIRNAME)
    assert_same(tuned, weights(pipeline_dir / "unet"))  # the pipeline holds stage 3's U-Net until the gate runs
    changed = sorted(k for k in tuned if not torch.equal(tuned[k], before["unet"][k]))
    assert changed, "stage 3 did not update the U-Net"
    assert all(re.search(r"attn2\.to_[kv]\.weight$", k) for k in changed), changed


def test_pipeline_loads_and_samples_after_stage3(stage3_run):
    _, pipeline_dir, _ = stage3_run
    pipe = PokeSpritePipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "A green grass type Pokémon.",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_stage3_records_inputs_clip_and_before_after(stage12, stage3_run):
    root, _ = stage12
    _, pipeline_dir, _ = stage3_run
    run = pipeline_dir.parent
    report = json.loads((run / "stage3_metrics.json").read_text())
    assert report["inputs"] == {"vae": str((root / "vae").resolve()), "unet": str((root / "unet").resolve())}
    assert report["clip"]["clip"] == f"domain_clip:{run / 'domain_clip'}"
    assert report["steps"] == 2
    for when in ("before", "after"):
        assert report[when]["val_reward"] <= 0  # a log-probability
        assert report[when]["val_denoise_loss"] > 0
        assert (run / "samples" / f"stage3_{when}.png").is_file()
    assert {"top1", "top5", "chance_top1"} <= report["domain_clip_retrieval"].keys()
    card = (pipeline_dir / "README.md").read_text()
    assert "domain_clip:domain_clip" in card and "val reward, trained against (before -> after)" in card
    assert str(run) not in card  # no machine-local path in a card
    assert "Stage 3: ran for these weights, 2 optimizer steps." in card
    assert not (pipeline_dir / "domain_clip").exists()
    scorer = load_clip_scorer(pipeline_dir)
    assert scorer.name == f"domain_clip:{run / 'domain_clip'}"
    metrics = {r["metric"] for r in read_losses(run / "losses.csv") if r["stage"] == "stage3"}
    assert {"loss", "reward", "kl", "denoise_loss", "reward_step", "grad_norm"} <= metrics


def test_stage3_refuses_without_stage12_weights(stage12, tiny_data_root, tmp_path):
    root, text = stage12
    cfg = make_cfg(tiny_data_root, text, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"stage-1 VAE.*missing_vae"):
        train_stage3(cfg, tmp_path / "missing_vae", root / "unet")
    (tmp_path / "empty_unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"stage-2 U-Net.*empty_unet.*--diffusion-checkpoint"):
        train_stage3(cfg, root / "vae", tmp_path / "empty_unet")
    with pytest.raises(FileNotFoundError, match="--vae-checkpoint"):
        train_stage3(cfg, None, root / "unet")
    assert not (tmp_path / cfg.runtime.experiment_name).exists()  # refused before creating anything


def test_stage3_stops_on_a_weak_domain_clip(stage12, stage3_run, tiny_data_root, tmp_path):
    root, text = stage12
    _, pipeline_dir, _ = stage3_run
    cfg = make_cfg(
        tiny_data_root,
        text,
        tmp_path,
        **{
            "clip.domain_clip_path": str(pipeline_dir.parent / "domain_clip"),
            "clip.min_top1_over_chance": 1000.0,
        },
    )
    with pytest.raises(DomainClipTooWeakError, match="min_top1_over_chance"):
        train_stage3(cfg, root / "vae", root / "unet")
    assert not (tmp_path / cfg.runtime.experiment_name / UNET_DIRNAME).exists()


def test_stage3_refuses_a_domain_clip_fitted_on_other_captions_or_blur(stage12, stage3_run, tiny_data_root, tmp_path):
    root, text = stage12
    _, pipeline_dir, _ = stage3_run
    fitted = pipeline_dir.parent / "domain_clip"
    assert json.loads((fitted / "retrieval_metrics.json").read_text())["captions"] == "visual"  # the default reward's
    cfg = make_cfg(
        tiny_data_root, text, tmp_path, **{"clip.domain_clip_path": str(fitted), "stage3.reward_captions": "dataset"}
    )
    with pytest.raises(ConfigError, match=r"fitted on visual captions, but stage3.reward_captions=dataset"):
        train_stage3(cfg, root / "vae", root / "unet")
    blurred = make_cfg(
        tiny_data_root, text, tmp_path, **{"clip.domain_clip_path": str(fitted), "clip.domain_blur_sigma": 2.0}
    )
    with pytest.raises(ConfigError, match=r"blurred by sigma 0, but clip.domain_blur_sigma=2"):
        train_stage3(blurred, root / "vae", root / "unet")


def test_stage3_refuses_when_the_gate_leaves_no_reward_prompts(stage12, stage3_run, tiny_data_root, tmp_path):
    root, text = stage12
    _, pipeline_dir, _ = stage3_run
    cfg = make_cfg(
        tiny_data_root, text, tmp_path, **{"clip.domain_clip_path": str(pipeline_dir.parent / "domain_clip"),
                                           "stage3.gate_samples": 1000}
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"training captions left for the reward.*stage3.gate_samples"):
        train_stage3(cfg, root / "vae", root / "unet")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_the_forward_process(prediction_type):
    cfg = load_config(overrides={"scheduler.prediction_type": prediction_type})
    scheduler = build_noise_scheduler(cfg.scheduler)
    x0 = torch.randn(3, 4, 5, 5)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 400, 900])
    noisy = scheduler.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(predict_x0(scheduler, noisy, target, t), x0, atol=1e-3, rtol=1e-3)


def tiny_reward_setup(stage12, stage3_run):
    """(a tiny U-Net with only its text cross-attention K/V trainable, a ``RewardLoss`` factory on 6 cached
    rows of random latents and embeddings, scored by the run's domain CLIP against random caption features)."""
    import copy

    from pokediff.models.clip import DomainClipScorer, load_domain_clip
    from pokediff.models.vae import SpriteVAE
    from pokediff.training.stage2_unet import DiffusionLoss, LatentTextCache
    from pokediff.training.stage3_reward import RewardLoss, mark_trainable

    root, _ = stage12
    cfg, pipeline_dir, _ = stage3_run
    clip, tokenizer, metrics = load_domain_clip(pipeline_dir.parent / "domain_clip")
    scorer = DomainClipScorer(clip, tokenizer).requires_grad_(False)
    vae = SpriteVAE.from_pretrained(root / "vae").requires_grad_(False).eval()
    unet = tiny_unet()
    reference = copy.deepcopy(unet).requires_grad_(False)
    names = mark_trainable(unet)
    assert names and all(re.search(r"attn2\.to_[kv]\.", n) for n in names)
    torch.manual_seed(0)
    n, length, dim = 6, 16, unet.config.encoder_hid_dim
    cache = LatentTextCache(
        torch.randn(n, 4, 16, 16), torch.full((n, 4, 16, 16), 0.1), torch.randn(n, length, dim),
        torch.ones(n, length, dtype=torch.long), torch.randn(1, length, dim), torch.ones(1, length, dtype=torch.long),
    )  # fmt: skip
    noise_scheduler = build_noise_scheduler(cfg.scheduler)
    common = dict(latent_clamp=5.0, huber_delta=cfg.stage2.huber_delta, min_snr_gamma=cfg.stage2.min_snr_gamma)
    denoise = DiffusionLoss(
        unet, noise_scheduler, cache, vae.scale_latents, caption_dropout=0.1, device="cpu", **common
    )
    features = torch.nn.functional.normalize(torch.randn(n, clip.config.embed_dim), dim=-1)

    def make_loss(reward_target: str, step_range: tuple) -> RewardLoss:
        return RewardLoss(
            unet, unet, reference, vae, scorer, noise_scheduler, cfg.scheduler, cache, denoise,
            prompt_embeds=cache.embeddings, prompt_masks=cache.masks, caption_features=features,
            caption_index=torch.arange(n), caption_candidates=None, num_inference_steps=4, guidance_scale=3.0, step_range=step_range,
            reward_target=reward_target, reward_weight=1.0, kl_weight=0.0, denoise_weight=0.0, denoise_batch_size=2,
            device="cpu", **common,
        )  # fmt: skip

    return unet, make_loss


@pytest.mark.parametrize("reward_target, step_range", [("step", (0.5, 0.5)), ("final", (0.75, 0.75))])
def test_reward_loss_rises_the_reward_on_a_fixed_batch(stage12, stage3_run, reward_target, step_range):
    """Only the cross-attention K/V train; at step 0 the KL anchor is 0; 30 AdamW steps of the reward term alone on
    one fixed batch (same noise, same step with gradients) raise the reward clearly, and the KL anchor then sees the
    move: with the reward on that step's clean-latent estimate, and on the finished sample (scored at the last
    step, where the gradient through the solver's update is exact)."""
    unet, make_loss = tiny_reward_setup(stage12, stage3_run)
    loss = make_loss(reward_target, step_range)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    index = torch.tensor([0, 3])
    rewards, kls = [], []
    for _ in range(30):
        torch.manual_seed(1)  # the same noise, real latents and flip every time
        total, parts = loss(index, 0)
        rewards.append(float(parts["reward"]))
        kls.append(float(parts["kl"]))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert kls[0] == pytest.approx(0.0, abs=1e-10)
    assert kls[-1] > 0
    assert rewards[-1] > rewards[0] + 0.1, rewards


def test_the_final_sample_reward_does_not_depend_on_the_step_with_gradients(stage12, stage3_run):
    """reward_target=final scores the finished sample: the same noise gives the same reward whichever step carries
    the gradients, and from the first step the gradient still reaches the trained K/V through the later updates;
    reward_target=step scores that step's estimate, which differs from step to step."""
    unet, make_loss = tiny_reward_setup(stage12, stage3_run)
    index = torch.tensor([0, 3])
    rewards = {}
    for target in ("final", "step"):
        for step_range in ((0.0, 0.0), (0.75, 0.75)):
            torch.manual_seed(1)
            unet.zero_grad()
            total, parts = make_loss(target, step_range)(index, 0)
            total.backward()
            rewards[target, step_range[0]] = float(parts["reward"])
            grads = [p.grad for p in unet.parameters() if p.requires_grad]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
    assert rewards["final", 0.0] == pytest.approx(rewards["final", 0.75], abs=1e-4)
    assert abs(rewards["step", 0.0] - rewards["step", 0.75]) > 1e-3


def test_the_reward_loss_does_not_use_the_gate_judges():
    """The judges that decide whether stage 3 ships (pokediff.eval: colour, shape, KID) are never part of its
    loss: nothing the training module holds at import time comes from pokediff.eval."""
    import pokediff.training.stage3_reward as reward

    used = {getattr(value, "__module__", "") or "" for value in vars(reward).values()}
    assert not any(module.startswith("pokediff.eval") for module in used), used


class Interrupt(Exception):
    pass


def test_stage3_resume_matches_an_uninterrupted_run(stage12, stage3_run, tiny_data_root, tmp_path, monkeypatch):
    from pokediff.training.checkpoints import CheckpointManager

    root, text = stage12
    _, full_pipeline, _ = stage3_run
    # the same judge as the uninterrupted run, so only the interruption differs
    cfg = make_cfg(
        tiny_data_root,
        text,
        tmp_path,
        **{"clip.domain_clip_path": str(full_pipeline.parent / "domain_clip"), "runtime.checkpoint_every_steps": 1},
    )
    real_save = CheckpointManager.save

    def save_then_die(self, state):
        path = real_save(self, state)
        if state.global_step == 1:
            raise Interrupt("killed after checkpoint 1")
        return path

    with monkeypatch.context() as m:
        m.setattr(CheckpointManager, "save", save_then_die)
        with pytest.raises(Interrupt):
            train_stage3(cfg, root / "vae", root / "unet")
    resumed = train_stage3(cfg, root / "vae", root / "unet", resume="latest")
    assert_same(weights(resumed.parent / UNET_DIRNAME), weights(full_pipeline.parent / UNET_DIRNAME))
    report = json.loads((resumed.parent / "stage3_metrics.json").read_text())
    assert report["steps"] == 2 and report["before"] is not None  # "before" survived the interruption
    steps = [r["step"] for r in read_losses(resumed.parent / "losses.csv") if r["metric"] == "loss"]
    assert steps == [1, 2]


# ----------------------------------------------------------------------------------------- the stage-3 gate
def test_gate_prompts_name_a_colour_or_a_shape_and_are_seeded(tiny_data_root, stage12, tmp_path):
    from pokediff.data import load_splits
    from pokediff.eval.color import target_color
    from pokediff.eval.shape import target_shape
    from pokediff.training.stage3_gate import gate_prompts

    _, text = stage12
    cfg = make_cfg(tiny_data_root, text, tmp_path, **{"stage3.gate_samples": 5})
    train = load_splits(cfg.data, require=("train",))["train"]
    judged = gate_prompts(cfg, train)
    assert len(judged.rows) == 5 == len(set(judged.rows)) and judged.rows == sorted(judged.rows)
    rows = train.remove_columns(cfg.data.image_column).to_list()
    for i, prompt, colour, shape in zip(judged.rows, judged.prompts, judged.colours, judged.shapes):
        assert prompt == rows[i][cfg.data.caption_column]
        assert (colour, shape) == (target_color(rows[i], prompt), target_shape(rows[i], prompt))
        assert colour is not None or shape is not None
    assert gate_prompts(cfg, train) == judged
    other = make_cfg(tiny_data_root, text, tmp_path, **{"stage3.gate_samples": 5, "runtime.seed": 7})
    assert gate_prompts(other, train).rows != judged.rows


def test_gate_balanced_accuracy_gives_nothing_for_always_answering_the_commonest_shape():
    from pokediff.eval.shape import balanced_accuracy

    always_upright = {"upright": {"upright": 8}, "quadruped": {"upright": 2}}
    assert balanced_accuracy(always_upright) == pytest.approx(0.5)  # plain accuracy would say 0.8
    assert balanced_accuracy({"upright": {"upright": 3, "quadruped": 1}, "quadruped": {"quadruped": 2}}) == 0.875
    assert balanced_accuracy({}) is None


def _changed(hits, better: int, worse: int) -> list:
    """``hits`` with the first ``better`` misses made right and the first ``worse`` hits made wrong."""
    out = list(hits)
    misses, rights = [i for i, h in enumerate(hits) if h is False], [i for i, h in enumerate(hits) if h]
    for i in misses[:better]:
        out[i] = True
    for i in rights[:worse]:
        out[i] = False
    return out


# 100 judged samples (+5 whose captions name nothing); stage 2 gets 60 colours and 30 shapes right
COLOUR_HITS = [True] * 60 + [False] * 40 + [None] * 5
SHAPE_HITS = [True] * 30 + [False] * 70 + [None] * 5


@pytest.mark.parametrize(
    "colour_change, shape_change, kid, kept, words",
    [
        ((12, 2), (0, 0), 0.103, "stage3", ["accepted", "colour 0.600 -> 0.700 (+12/-2 samples, p=0.0065)"]),
        ((0, 0), (12, 2), 0.106, "stage2", ["rejected", "KID 0.1060 > 1.05 x 0.1000"]),
        # 2 more right of 100: the score rose, but a sign test cannot tell it from noise
        ((3, 1), (0, 0), 0.090, "stage2", ["rejected (no significant gain in colour or shape at p <= 0.05)"]),
        ((12, 2), (2, 12), 0.090, "stage2", ["rejected (shape went down)"]),
        ((12, 2), (1, 3), 0.090, "stage3", ["accepted", "shape 0.300 -> 0.280 (+1/-3 samples"]),
    ],
)
def test_gate_decides_on_significant_colour_shape_changes_and_kid(colour_change, shape_change, kid, kept, words):
    from pokediff.training.stage3_gate import decide

    def arm(colour_hits, shape_hits, kid):
        scored = [h for h in colour_hits if h is not None], [h for h in shape_hits if h is not None]
        return {
            "colour": sum(scored[0]) / len(scored[0]),
            "shape": sum(scored[1]) / len(scored[1]),  # one shape group here: balanced = plain accuracy
            "kid": kid,
            "hits": {"colour": colour_hits, "shape": shape_hits},
        }

    stage2 = arm(COLOUR_HITS, SHAPE_HITS, 0.100)
    stage3 = arm(_changed(COLOUR_HITS, *colour_change), _changed(SHAPE_HITS, *shape_change), kid)
    verdict, reason, paired = decide(stage2, stage3, 0.05, 0.05)
    assert verdict == kept, reason
    assert paired["colour"]["better"] == colour_change[0] and paired["shape"]["worse"] == shape_change[1]
    for word in words:
        assert word in reason


def test_sign_test_is_exact_and_skips_unjudged_samples():
    from pokediff.training.stage3_gate import sign_test

    result = sign_test([False, False, False, True, None], [True, True, True, True, True])
    # 3 better, 0 worse: P(X >= 3 | n=3) = 1/8; the sample without a target counts for nothing
    assert result == {"better": 3, "worse": 0, "p_better": 0.125, "p_worse": 1.0}
    assert sign_test([True], [True]) == {"better": 0, "worse": 0, "p_better": 1.0, "p_worse": 1.0}
    with pytest.raises(ValueError, match="2 samples before but 1 after"):
        sign_test([True, False], [True])


@pytest.mark.parametrize("verdict", ["stage2", "stage3"])
def test_gate_puts_stage2_unet_back_unless_stage3_wins(stage12, stage3_run, tmp_path, monkeypatch, verdict):
    import shutil

    from pokediff.training import stage3_gate

    root, _ = stage12
    cfg, pipeline_dir, _ = stage3_run
    run = tmp_path / "run"
    shutil.copytree(pipeline_dir.parent, run)  # the module's stage-3 run stays as it was for the other tests
    seen = []
    real_decide = stage3_gate.decide

    def fixed(s2, s3, limit, alpha):
        seen.append((s2, s3))
        return verdict, *real_decide(s2, s3, limit, alpha)[1:]

    monkeypatch.setattr(stage3_gate, "decide", fixed)
    result = stage3_gate.gate_stage3(cfg, run, "cpu")

    ((s2, s3),) = seen
    for scores in (s2, s3):
        assert 0.0 <= scores["colour"] <= 1.0 and scores["kid"] == pytest.approx(scores["kid"])
    report = json.loads((run / "stage3_metrics.json").read_text())
    assert report["gate"] == result and result["kept"] == verdict
    assert result["stage2"] == {k: v for k, v in s2.items() if k != "hits"}  # the per-sample hits stay out
    assert set(result["paired"]) == {"colour", "shape"} and len(s2["hits"]["colour"]) == len(s3["hits"]["colour"])
    assert "before" in report and "after" in report  # stage 3's own record is kept beside the verdict
    expected = weights(root / "unet") if verdict == "stage2" else weights(run / UNET_DIRNAME)
    assert_same(weights(run / "pipeline" / "unet"), expected)
    assert_same(weights(run / UNET_DIRNAME), weights(pipeline_dir.parent / UNET_DIRNAME))  # kept for inspection
    PokeSpritePipeline.from_pretrained(str(run / "pipeline"))  # still a whole, loadable pipeline
    card = (run / "pipeline" / "README.md").read_text()  # the card claims stage 3 only if its U-Net is there
    assert "stage 3 gate" in card and result["reason"].split(":")[0] in card
    assert ("Stage 3: ran for these weights" in card) == (verdict == "stage3")


def test_shape_negatives_contrast_each_caption_with_itself_naming_other_shapes(tiny_data_root):
    """stage3.reward_negatives=shape: each row's candidates are its visual caption with every body shape named,
    its target is its own caption; the reward is then a softmax over those candidates only."""
    from pokediff.config import load_config
    from pokediff.data import load_splits
    from pokediff.data.captions import SHAPE_PHRASES
    from pokediff.training.stage3_reward import contrastive_reward, reward_captions, reward_targets

    cfg = load_config(overrides={"data.root": str(tiny_data_root), "stage3.reward_negatives": "shape"})
    split = load_splits(cfg.data, require=("train",))["train"]
    captions = reward_captions(cfg, split)
    table, target, candidates = reward_targets(cfg, split, captions)
    assert candidates.shape == (len(captions), len(SHAPE_PHRASES)) and target.shape == (len(captions),)
    for i, caption in enumerate(captions):
        named = [table[j] for j in candidates[i]]
        assert named[target[i]] == caption and len(set(named)) == len(SHAPE_PHRASES)
        prefix = caption.split(" pokémon ")[0]
        assert all(n.startswith(prefix + " pokémon ") for n in named)

    class Scorer:  # image features = the pixels' first 3 values: enough to check the arithmetic
        logit_scale = torch.tensor(2.0)

        def image_features(self, images):
            return images.flatten(1)[:, :3]

    features = torch.nn.functional.normalize(torch.randn(6, 3), dim=-1)
    images = torch.rand(2, 1, 1, 3)
    subset = torch.tensor([[4, 1, 5], [0, 2, 3]])
    got = contrastive_reward(Scorer(), images, features, torch.tensor([2, 0]), subset)
    logits = 2.0 * images.flatten(1) @ features.T
    expected = torch.stack([logits[0, [4, 1, 5]].log_softmax(0)[2], logits[1, [0, 2, 3]].log_softmax(0)[0]])
    torch.testing.assert_close(got, expected)
    everything = contrastive_reward(Scorer(), images, features, torch.tensor([5, 0]))
    torch.testing.assert_close(everything, logits.log_softmax(-1)[[0, 1], [5, 0]])


def test_shape_guidance_fits_a_classifier_saves_it_and_the_gate_judges_it(
    stage12, tiny_data_root, tmp_path, monkeypatch
):
    from pokediff.models.shape_classifier import SpriteShapeClassifier
    from pokediff.training import stage3_gate
    from pokediff.training.stage3_shape import CLASSIFIER_DIRNAME, train_shape_guidance

    root, text = stage12
    cfg = make_cfg(
        tiny_data_root, text, tmp_path / "out", **{"stage3.method": "shape_guidance",
        "stage3.shape_classifier_epochs": 2, "stage3.shape_guidance_scale": 25.0, "stage3.gate_samples": 6},
    )  # fmt: skip
    pipeline_dir = train_shape_guidance(cfg, root / "vae", root / "unet")
    run = pipeline_dir.parent
    report = json.loads((run / "stage3_metrics.json").read_text())
    assert report["method"] == "shape_guidance" and report["shape_guidance_scale"] == 25.0
    assert 0 <= report["shape_classifier"]["val_accuracy"] <= 1 and report["shape_classifier"]["epochs"] == 2
    assert_same(weights(pipeline_dir / "unet"), weights(root / "unet"))  # the U-Net is stage 2's
    pipe = PokeSpritePipeline.from_pretrained(str(pipeline_dir))
    assert isinstance(pipe.shape_classifier, SpriteShapeClassifier) and pipe.config.shape_guidance_scale == 25.0
    assert "shape guidance, scale 25" in (pipeline_dir / "README.md").read_text()

    seen = []

    def rejected(s2, s3, limit, alpha):
        seen.append((s2, s3))
        return "stage2", "rejected (test)", {}

    monkeypatch.setattr(stage3_gate, "decide", rejected)
    verdict = stage3_gate.gate_stage3(cfg, run, "cpu")
    ((s2, s3),) = seen
    assert len(s2["hits"]["shape"]) == len(s3["hits"]["shape"]) == 6 and verdict["kept"] == "stage2"
    kept = PokeSpritePipeline.from_pretrained(str(pipeline_dir))  # rejected: saved without the classifier
    assert kept.shape_classifier is None and kept.config.shape_guidance_scale == 0.0
    assert (run / CLASSIFIER_DIRNAME).is_dir()  # kept for inspection
    assert "Stage 3: ran for these weights" not in (pipeline_dir / "README.md").read_text()


def test_gate_benchmark_rejudges_a_shape_guidance_run_with_config_overrides(tmp_path, monkeypatch):
    from pokediff.training import stage3_gate

    module = load_benchmark("stage3_gate")
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    configs = Path(__file__).resolve().parent.parent / "configs"
    (run / "config.yaml").write_text(f"base: {configs / 'tiny.yaml'}\n")
    (run / "pipeline" / "model_index.json").write_text("{}")
    (run / "stage3_metrics.json").write_text("{}")
    with pytest.raises(
        SystemExit,
        match=r"^error: .* has no finished stage 3 \(stage3_metrics.json and unet_stage3/ or shape_classifier/\)",
    ):
        module.main([str(run)])

    (run / "shape_classifier").mkdir()
    (run / "shape_classifier" / "config.json").write_text("{}")  # a shape_guidance run has no unet_stage3/
    seen = []
    monkeypatch.setattr(stage3_gate, "gate_stage3", lambda cfg, run, device: seen.append(cfg) or {"kept": "stage2"})
    verdict = module.main([str(run), "--set", "stage3.gate_samples=7"])
    assert verdict["kept"] == "stage2" and seen[0].stage3.gate_samples == 7
