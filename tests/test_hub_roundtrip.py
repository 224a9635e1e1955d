"""Hub round trips proven over HTTP: the real huggingface_hub client against ``hub_server.HubServer`` on 127.0.0.1.

Nothing of the hub client is mocked. Pushes run in this process with the client pointed at the test hub
(``point_client_at``); the loads run in a fresh interpreter with ``HF_ENDPOINT`` set before any import, since
diffusers and transformers keep hub settings from import time, each load in a fresh cache.
"""

import copy
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline
from hub_server import INVALID_TOKEN, HubServer, client_env, point_client_at
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from tiny import tiny_pipeline

from pokediff.hub import push_pipeline_folder, recorded_facts, write_model_card
from pokediff.pipeline import PokeSpritePipeline

USER, TOKEN = "user", "hf_user_token"
OTHER_TOKEN = "hf_someone_else_token"  # a valid token of another user
WRONG_TOKEN = "hf_not_a_token_the_hub_knows"
PROMPT = "a small green creature"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub():
    with HubServer({TOKEN: USER, OTHER_TOKEN: "someone-else"}) as server:
        yield server


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """This process's hub client pointed at the test hub, logged in as USER, with a fresh cache."""
    point_client_at(monkeypatch, hub.url, tmp_path / "hf_home", TOKEN)
    return hub


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny_pipe"))


def sprite(pipe) -> torch.Tensor:
    """The sprite every load draws: same prompt, seed and steps as the fresh interpreter's."""
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images


def local_sprite(folder) -> torch.Tensor:
    loaded = PokeSpritePipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    return sprite(loaded)


def file_hashes(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``: byte-identical folders compare equal."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def pushed(hub, pipe, tmp_path_factory):
    """Pushes over HTTP: two of pokediff's ``push_pipeline_folder`` to one repo (the second with retrained U-Net
    weights), and diffusers' own ``push_to_hub`` to another, which then also gets a pickle no load may fetch."""
    root = tmp_path_factory.mktemp("pushed")
    first, second, saved = root / "first", root / "second", root / "saved"
    pipe.save_pretrained(saved)
    shutil.copytree(saved, first)
    write_model_card(first, stages={2: 7}, extra={"stage 2 best val loss": 0.1})
    shutil.copytree(first, second)
    retrained = copy.deepcopy(pipe)  # (not loaded from a folder: that would change every config's _name_or_path)
    with torch.no_grad():
        for param in retrained.unet.parameters():
            param.add_(0.01)
    retrained.save_pretrained(second)  # keeps the card
    with pytest.MonkeyPatch.context() as mp:
        point_client_at(mp, hub.url, root / "hf_home", TOKEN)
        first_commit = push_pipeline_folder(first, "pokesprite", metrics={"fid": 40.0})
        second_commit = push_pipeline_folder(second, "pokesprite", metrics={"fid": 40.0})
        diffusers_commit = pipe.push_to_hub("pokesprite-pushed")
        pickle_commit = HfApi().upload_file(
            path_or_fileobj=b"a pickle: loading it could run any code",
            path_in_repo="unet/diffusion_pytorch_model.bin",
            repo_id="user/pokesprite-pushed",
        )
    return SimpleNamespace(
        root=root,
        first=first,
        second=second,
        saved=saved,
        first_commit=first_commit,
        second_commit=second_commit,
        diffusers_commit=diffusers_commit,
        pickle_commit=pickle_commit,
    )


_LOAD_FROM_THE_HUB = (
    r"""
import hashlib, json, sys
from pathlib import Path

import torch

jobs, out, threads = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)  # the parent's: another thread count sums in another order (not bit-equal)
from diffusers import DiffusionPipeline
from pokediff import PokeSpritePipeline

results, images = {}, {}
for name, way, repo_id, revision, cache_dir in jobs:
    if way == "trust_remote_code":
        pipe = DiffusionPipeline.from_pretrained(repo_id, revision=revision, cache_dir=cache_dir, trust_remote_code=True)
    else:
        pipe = PokeSpritePipeline.from_pretrained(repo_id, revision=revision, cache_dir=cache_dir)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images[name] = pipe("%s", num_inference_steps=2, generator=generator, output_type="pt").images
    snapshots = list(Path(cache_dir).glob("models--*/snapshots/*"))
    files = {
        str(p.relative_to(snapshot)): hashlib.sha256(p.read_bytes()).hexdigest()
        for snapshot in snapshots for p in snapshot.rglob("*") if p.is_file()
    }
    results[name] = {
        "class": f"{type(pipe).__module__}.{type(pipe).__name__}",
        "snapshots": [s.name for s in snapshots],
        "files": files,
    }
torch.save(images, out)
print(json.dumps(results))
"""
    % PROMPT
)


@pytest.fixture(scope="module")
def loaded(hub, pushed):
    """Every load in one fresh interpreter (``HF_ENDPOINT`` set before its imports), each in a fresh cache."""
    home = pushed.root / "fresh_home"
    first_sha = pushed.first_commit.oid
    jobs = [
        ("latest", "pokediff", "user/pokesprite", None),
        ("latest_remote_code", "trust_remote_code", "user/pokesprite", None),
        ("first", "pokediff", "user/pokesprite", first_sha),
        ("pushed", "pokediff", "user/pokesprite-pushed", None),
        ("pushed_remote_code", "trust_remote_code", "user/pokesprite-pushed", None),
    ]
    jobs = [(*job, str(home / f"cache_{job[0]}")) for job in jobs]
    env = {**os.environ, **client_env(hub.url, home, TOKEN), "PYTHONPATH": str(ROOT)}
    env.pop("TRANSFORMERS_OFFLINE", None)
    out = pushed.root / "images.pt"
    argv = [sys.executable, "-c", _LOAD_FROM_THE_HUB, json.dumps(jobs), str(out), str(torch.get_num_threads())]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(out, weights_only=True)


# ------------------------------------------------------------------------------ pushes
def test_push_pipeline_folder_commits_every_file_byte_identical(online, pushed, tmp_path):
    first = pushed.first_commit
    assert first.repo_url.repo_id == f"{USER}/pokesprite"  # the namespace comes from the token
    api = HfApi(endpoint=online.url, token=TOKEN)
    info = api.model_info("user/pokesprite", revision=first.oid)
    assert info.sha == first.oid
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs is not None}
    local = file_hashes(pushed.first)
    assert {"model_index.json", "pipeline_pokesprite.py", "vae/sprite_vae.py"} <= local.keys()  # and the code
    # the weights went through the large-file (LFS) upload, checked against their sha256
    weights = {path for path in local if path.endswith(".safetensors")}
    assert weights and set(lfs) == weights and all(lfs[path] == local[path] for path in weights)
    # ... to the pre-signed link, which takes no Authorization header (the server refuses one)
    puts = [sent_auth for method, path, sent_auth in online.requests if method == "PUT"]
    assert puts and not any(puts)
    folder = snapshot_download(
        "user/pokesprite", revision=first.oid, endpoint=online.url, cache_dir=tmp_path, token=TOKEN
    )
    assert file_hashes(folder) == {**local, ".gitattributes": file_hashes(folder)[".gitattributes"]}


def test_second_push_is_a_second_commit_of_the_changed_file_only(online, pushed):
    """Retrained weights pushed again: a second commit on top of the first, holding only what changed."""
    commits = HfApi(endpoint=online.url, token=TOKEN).list_repo_commits("user/pokesprite")
    assert [c.commit_id for c in commits[:2]] == [pushed.second_commit.oid, pushed.first_commit.oid]
    assert [c.title for c in commits] == ["Upload PokeSpritePipeline"] * 2 + ["initial commit"]
    # the client skipped the unchanged files (the preupload answer carries each file's oid)
    assert online.commits("user/pokesprite")[0].changed == ["unet/diffusion_pytorch_model.safetensors"]


def test_card_metadata_arrives_intact(online, pushed, tmp_path):
    readme = hf_hub_download("user/pokesprite", "README.md", endpoint=online.url, cache_dir=tmp_path, token=TOKEN)
    assert Path(readme).read_bytes() == (pushed.second / "README.md").read_bytes()
    remote, local = ModelCard.load(readme), ModelCard.load(pushed.second / "README.md")
    assert remote.data.to_dict() == local.data.to_dict()
    facts = recorded_facts(pushed.second)
    assert facts["stages"] == {2: 7} and facts["metrics"] == {"fid": 40.0}
    assert facts["extra"] == {"stage 2 best val loss": 0.1}
    # the hub read the front matter as it arrived (model_info's cardData)
    info = HfApi(endpoint=online.url, token=TOKEN).model_info("user/pokesprite")
    as_json = json.loads(json.dumps(remote.data.to_dict()))  # the hub answers in JSON: {2: 7} arrives as {"2": 7}
    assert info.card_data.to_dict() == as_json and info.card_data.library_name == "diffusers"
    text = remote.text
    assert 'PokeSpritePipeline.from_pretrained("user/pokesprite")' in text and "| fid | 40 |" in text
    assert 'DiffusionPipeline.from_pretrained("user/pokesprite", trust_remote_code=True)' in text
    # the facts recorded when training wrote the card survive the upload's re-render
    assert "Stage 2: ran for these weights, 7 optimizer steps." in text and "| stage 2 best val loss | 0.1 |" in text


# ------------------------------------------------------------------------------ loads, fresh interpreter
@pytest.mark.parametrize(
    "name, folder",
    [
        ("latest", "second"),
        ("latest_remote_code", "second"),
        ("first", "first"),
        ("pushed", "saved"),
        ("pushed_remote_code", "saved"),
    ],
)
def test_hub_loads_draw_the_local_folders_sprite(pushed, loaded, name, folder):
    """Each hub load, pokediff's and diffusers' ``trust_remote_code``, draws the local folder's sprite exactly."""
    results, images = loaded
    local = getattr(pushed, folder)
    assert torch.equal(images[name], local_sprite(local))
    remote_code = name.endswith("remote_code")
    if remote_code:  # the code the repo carries, run by diffusers
        assert results[name]["class"] == "diffusers_modules.local.pipeline_pokesprite.PokeSpritePipeline"
    else:  # the installed class; the repo's code is not run
        assert results[name]["class"] == "pokediff.pipeline.PokeSpritePipeline"
    commits = {"first": pushed.first_commit, "pushed": pushed.pickle_commit}
    commit = commits.get(name.removesuffix("_remote_code"), pushed.second_commit)
    assert results[name]["snapshots"] == [commit.oid]
    # every file a load fetched is byte-identical to the local folder's, and the pickle is never fetched
    hub_only = {".gitattributes"} | ({"README.md"} if folder == "saved" else set())  # diffusers' card for push_to_hub
    fetched = {path: sha for path, sha in results[name]["files"].items() if path not in hub_only}
    local_files = file_hashes(local)
    assert fetched == {path: local_files.get(path) for path in fetched}
    if remote_code:  # diffusers fetches what model_index.json names
        assert {p for p in local_files if p.endswith((".py", ".safetensors"))} <= fetched.keys()
    else:
        assert fetched.keys() == local_files.keys()


def test_first_revision_keeps_the_first_weights(pushed, loaded):
    """``revision=<first commit>`` loads the first push's weights, not the latest."""
    _, images = loaded
    assert torch.equal(images["first"], local_sprite(pushed.first))
    assert not torch.equal(images["first"], images["latest"])


# ------------------------------------------------------------------------------ diffusers' push path
def test_save_pretrained_push_keeps_the_repo_card_and_the_diffusers_signature(pipe, online, tmp_path):
    ours = inspect.signature(PokeSpritePipeline.save_pretrained).parameters
    assert list(ours) == list(inspect.signature(DiffusionPipeline.save_pretrained).parameters)
    assert "push_to_hub" not in PokeSpritePipeline.__dict__  # diffusers' own push_to_hub (it calls save_pretrained)
    api = HfApi()  # the client as configured: endpoint and token from the environment
    api.create_repo("pokesprite-card")
    api.upload_file(
        path_or_fileobj=b"---\nlicense: other\n---\nthe repo's card\n",
        path_in_repo="README.md",
        repo_id="user/pokesprite-card",
    )
    pipe.save_pretrained(tmp_path / "pokesprite-card", push_to_hub=True, commit_message="first")
    head = api.list_repo_commits("user/pokesprite-card")[0]
    assert head.title == "first"
    card = Path(hf_hub_download("user/pokesprite-card", "README.md")).read_text()
    assert "the repo's card" in card and "library_name: diffusers" in card
    index = json.loads(Path(hf_hub_download("user/pokesprite-card", "model_index.json")).read_text())
    assert index["_class_name"] == ["pipeline_pokesprite", "PokeSpritePipeline"]
    pushed = pipe.push_to_hub("pokesprite-card")  # nothing changed: no new commit
    assert pushed.oid == head.commit_id == api.model_info("user/pokesprite-card").sha


# ------------------------------------------------------------------------------ GAN checkpoints
def test_gan_checkpoint_round_trip(online, tmp_path):
    """GAN checkpoints have no hub helper: a checkpoint folder goes up with ``upload_folder`` and comes back with
    ``snapshot_download`` or file by file with ``hf_hub_download``, then loads with the GAN's own loader."""
    from test_gan_training import batches, tiny_trainer

    from pokediff.gan.checkpoint import load_generator
    from pokediff.gan.generate import sample_from_checkpoint

    trainer = tiny_trainer("wgan_large")
    trainer.train_step(batches())
    checkpoint = trainer.save(tmp_path / "run" / "checkpoints" / "step_0000001")
    api = HfApi(endpoint=online.url, token=TOKEN)
    repo_id = api.create_repo("gan-sprites").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=checkpoint, commit_message="GAN checkpoint at step 1")
    fetched = snapshot_download(repo_id, endpoint=online.url, cache_dir=tmp_path / "cache", token=TOKEN)
    assert file_hashes(fetched) == {**file_hashes(checkpoint), ".gitattributes": file_hashes(fetched)[".gitattributes"]}
    assert torch.equal(sample_from_checkpoint(fetched, 4, seed=1), sample_from_checkpoint(checkpoint, 4, seed=1))
    # file by file with hf_hub_download, then the GAN's own loader
    one_by_one = tmp_path / "one_by_one"
    for name in ("gan_checkpoint.json", "generator_ema.safetensors"):
        path = hf_hub_download(repo_id, name, endpoint=online.url, cache_dir=tmp_path / "cache2", token=TOKEN)
        one_by_one.mkdir(exist_ok=True)
        shutil.copy(path, one_by_one / name)
    generator, meta = load_generator(one_by_one)
    assert meta["loaded_weights"] == "generator_ema"
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in generator.state_dict().items())


# ------------------------------------------------------------------------------ refusals
def test_wrong_token_is_refused(online, pushed, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(pushed.first, folder)
    with pytest.raises(HfHubHTTPError) as refused:
        push_pipeline_folder(folder, "user/pokesprite-wrong-token", token=WRONG_TOKEN)
    assert refused.value.response.status_code == 401 and INVALID_TOKEN in str(refused.value)
    assert "user/pokesprite-wrong-token" not in online.repos


def test_private_repo_cannot_be_read_without_a_token(online, pushed, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(pushed.first, folder)
    repo_id = push_pipeline_folder(folder, "pokesprite-private", private=True).repo_url.repo_id
    assert online.repos[repo_id].private
    with pytest.raises(RepositoryNotFoundError) as no_token:
        snapshot_download(repo_id, endpoint=online.url, cache_dir=tmp_path / "c1", token=False)
    assert no_token.value.response.status_code == 401  # as the Hub answers a private repo without a token
    with pytest.raises(RepositoryNotFoundError) as other_user:
        snapshot_download(repo_id, endpoint=online.url, cache_dir=tmp_path / "c2", token=OTHER_TOKEN)
    assert other_user.value.response.status_code == 404
    owner = snapshot_download(repo_id, endpoint=online.url, cache_dir=tmp_path / "c3", token=TOKEN)
    assert file_hashes(owner) == {**file_hashes(folder), ".gitattributes": file_hashes(owner)[".gitattributes"]}


def one_error_line(capsys) -> str:
    """The CLI convention (tests/test_bad_inputs.py): one ``error: ...`` line on stderr, no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_hub_refusals_are_one_error_line_from_the_clis(online, pushed, tmp_path, monkeypatch, capsys):
    import train_3stage
    from pokediff.errors import report_user_errors
    from pokediff.generate import main as generate

    folder = tmp_path / "pipeline"
    shutil.copytree(pushed.first, folder)
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--push-to-hub", "--hub-model-id", "user/pokesprite-cli"]
    cfg = train_3stage.build_run_config(train_3stage.parse_args(argv))
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        report_user_errors(train_3stage.push_pipeline, cfg, folder)  # what training runs last with --push-to-hub
    assert exit_.value.code == 2
    line = one_error_line(capsys)
    assert "401" in line and INVALID_TOKEN in line and "token" in line.split(INVALID_TOKEN)[-1], line
    # a private repo read without a token: the generate CLI
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo_id = push_pipeline_folder(folder, "pokesprite-secret", private=True).repo_url.repo_id
    monkeypatch.delenv("HF_TOKEN")
    capsys.readouterr()
    assert generate(["--model", repo_id, "a cat", "--num", "1", "--out", str(tmp_path / "s.png")]) == 2
    line = one_error_line(capsys)
    assert "401" in line and repo_id in line and "private" in line, line
