"""Hub repo ids wherever a model folder is taken, against a cache that huggingface_hub lays out itself.

A tiny Hub runs in a thread on 127.0.0.1 and answers the endpoints that huggingface_hub's snapshot_download
calls (the repo's revision info, its file tree, and HEAD and GET of each file's resolve URL); a first process,
pointed at it by HF_ENDPOINT with a fresh HF_HOME, fetches a diffusers pipeline folder through ddpm, so that
huggingface_hub writes blobs/, snapshots/<commit>/ and refs/main as it would from huggingface.co. Later
processes load that cache with HF_HUB_OFFLINE=1 and the Hub stopped.
"""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub
import pytest
import torch
from huggingface_hub import snapshot_download
from test_interop import TINY_2_LEVELS, save_diffusers  # pytest puts tests/ on sys.path

import ddpm
import ddpm.hub
from ddpm.fid.__main__ import main as fid_main
from ddpm.hub import MODEL_FILES, HubError, hub_repo_id, local_path
from ddpm.inference import load_for_sampling
from ddpm.interop.diffusers import unet_from_diffusers
from ddpm.io import CheckpointError
from ddpm.models import UNet
from ddpm.source import resolve_source

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]
REPO = "hub-user/tiny-ddpm"


class FakeHub:
    """A Hub of a few model repos, {repo id: {path in the repo: bytes}}, each at the commit its files hash to;
    `requests` records (method, path) of every request. Unknown repos answer 401 RepoNotFound, as the Hub
    does. It takes pushes too: a repo created, then files committed (each uploaded in the commit itself, as
    huggingface_hub does for files the preupload answer calls "regular")."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_POST(self):
                hub.receive(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def commits(self) -> dict[str, str]:
        return {
            repo: hashlib.sha1(
                json.dumps(sorted((p, hashlib.sha1(b).hexdigest()) for p, b in files.items())).encode()
            ).hexdigest()
            for repo, files in self.repos.items()
        }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:  # /api/models/NS/NAME/revision/REV or /tree/REV
            repo, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
            file_path = None
        else:  # /NS/NAME/resolve/REV/PATH
            repo, kind, revision, file_path = "/".join(parts[:2]), parts[2], parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return self.send(request, 401, b"", {"X-Error-Code": "RepoNotFound"}, body)
        commit, files = self.commits[repo], self.repos[repo]
        if revision not in ("main", commit):
            return self.send(request, 404, b"", {"X-Error-Code": "RevisionNotFound"}, body)
        if kind == "revision":
            info = {"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in files]}
            return self.send(request, 200, json.dumps(info).encode(), {}, body)
        if kind == "tree":
            tree = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in files.items()
            ]
            return self.send(request, 200, json.dumps(tree).encode(), {}, body)
        if kind == "resolve" and file_path in files:
            content = files[file_path]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}
            return self.send(request, 200, content, headers, body)
        return self.send(request, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, body)

    def receive(self, request: BaseHTTPRequestHandler) -> None:
        """POST: create a repo, validate a model card, say how to upload files, commit them."""
        path = unquote(urlsplit(request.path).path)
        self.requests.append(("POST", path))
        data = request.rfile.read(int(request.headers["Content-Length"]))
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            payload = json.loads(data)
            repo = f"{payload['organization']}/{payload['name']}"
            self.repos.setdefault(repo, {})
            return self.send(request, 200, json.dumps({"url": f"{self.url}/{repo}"}).encode(), {}, True)
        if path == "/api/validate-yaml":
            return self.send(request, 200, b"{}", {}, True)
        repo, kind = "/".join(parts[2:4]), parts[4]
        if repo not in self.repos:
            return self.send(request, 404, b"", {"X-Error-Code": "RepoNotFound"}, True)
        if kind == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in json.loads(data)["files"]
            ]
            return self.send(request, 200, json.dumps({"files": files}).encode(), {}, True)
        assert kind == "commit", path
        for line in data.decode().splitlines():
            item = json.loads(line)
            assert item["key"] in ("header", "file"), item["key"]  # every file "regular", none LFS
            if item["key"] == "file":
                self.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        commit = self.commits[repo]
        answer = {
            "commitUrl": f"{self.url}/{repo}/commit/{commit}",
            "commitOid": commit,
            "pullRequestUrl": None,
        }
        return self.send(request, 200, json.dumps(answer).encode(), {}, True)

    @staticmethod
    def send(request, status: int, content: bytes, headers: dict, body: bool) -> None:
        request.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            request.wfile.write(content)


def run(code_or_args: str | list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """python -c CODE (or python ARGS) in a fresh process with `env` on top of ours (a None value unsets the
    variable), this worktree first."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env |= {"PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1", "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=cwd)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A diffusers DDPMPipeline folder as diffusers saves it, plus files a model does not need."""
    folder = tmp_path_factory.mktemp("tiny-ddpm")
    config = {**TINY_2_LEVELS, "block_out_channels": [4, 4], "norm_num_groups": 2, "add_attention": False}
    config |= {"down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    unet = save_diffusers(folder / "tmp", config)
    diffusers.DDPMPipeline(
        unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50)
    ).save_pretrained(folder / "pipe")
    (folder / "pipe" / "README.md").write_text("# a model card\n")
    (folder / "pipe" / "samples").mkdir()
    (folder / "pipe" / "samples" / "grid.png").write_bytes(b"not needed")
    return folder / "pipe"


@pytest.fixture(scope="module")
def hub_cache(pipeline, tmp_path_factory) -> tuple[Path, FakeHub]:
    """HF_HOME after one process fetched REPO from the fake Hub through ddpm; the Hub is stopped after."""
    files = {str(p.relative_to(pipeline)): p.read_bytes() for p in pipeline.rglob("*") if p.is_file()}
    hub = FakeHub({REPO: files})
    home = tmp_path_factory.mktemp("hf_home")
    try:
        done = run(
            f"from ddpm.hub import local_path; print(local_path({REPO!r}))",
            {"HF_HOME": str(home), "HF_ENDPOINT": hub.url},
            home,
        )
    finally:
        hub.stop()
    assert done.returncode == 0, done.stderr
    cached = home / "hub" / "models--hub-user--tiny-ddpm"
    assert Path(done.stdout.strip().splitlines()[-1]) == cached / "snapshots" / hub.commits[REPO]
    return home, hub


def test_a_repo_id_is_fetched_into_the_cache_huggingface_hub_lays_out_with_only_the_model_files(hub_cache):
    home, hub = hub_cache
    cached = home / "hub" / "models--hub-user--tiny-ddpm"
    commit = hub.commits[REPO]
    assert (cached / "refs" / "main").read_text() == commit
    snapshot = cached / "snapshots" / commit
    fetched = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if not p.is_dir())
    assert fetched == sorted(set(hub.repos[REPO]) & set(MODEL_FILES))
    assert "unet/diffusion_pytorch_model.safetensors" in fetched and "README.md" not in fetched
    for name in fetched:  # huggingface_hub's layout: snapshot entries link to content-addressed blobs
        assert (snapshot / name).is_symlink()
        assert (snapshot / name).resolve().parent == (cached / "blobs").resolve()
        assert (snapshot / name).read_bytes() == hub.repos[REPO][name]
    downloads = {path for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert all(path.split(f"/resolve/{commit}/")[1] in MODEL_FILES for path in downloads)


def test_offline_the_cached_repo_loads_everywhere_a_model_folder_is_taken(hub_cache, pipeline, tmp_path):
    home, _ = hub_cache
    code = f"""
import torch, ddpm
from ddpm.interop.diffusers import unet_from_diffusers
from ddpm.inference import load_for_sampling
model, scheduler = ddpm.load_pretrained({REPO!r})
network = unet_from_diffusers({REPO!r} + "@main")
loaded = load_for_sampling({REPO!r})
x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
t = torch.tensor([3, 40])
torch.save([model(x, t), network(x, t), loaded.model(x, t), scheduler.config, loaded.weights], "out.pt")
"""
    offline = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = run(code, offline, tmp_path)
    assert done.returncode == 0, done.stderr
    out1, out2, out3, config, weights = torch.load(tmp_path / "out.pt", weights_only=True)
    reference, expected_scheduler = ddpm.load_pretrained(pipeline)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference(x, torch.tensor([3, 40]))
    for out in (out1, out2, out3):
        torch.testing.assert_close(out, expected)
    assert config == expected_scheduler.config and config["num_train_timesteps"] == 50
    assert weights == "diffusers"

    # sample.py --checkpoint with the repo id, offline.
    grid = tmp_path / "grid.png"
    args = [
        "sample.py",
        "--checkpoint",
        REPO,
        "--n",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out",
        str(grid),
    ]
    done = run([str(ROOT / args[0]), *args[1:]], offline, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(grid) and grid.is_file()


def test_offline_a_repo_not_in_the_cache_is_one_line_naming_it_the_cache_and_the_fetch(tmp_path):
    offline = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    done = run(
        [str(ROOT / "sample.py"), "--checkpoint", "google/ddpm-cifar10-32@v1", "--n", "1"], offline, tmp_path
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    message = done.stderr
    assert "google/ddpm-cifar10-32" in message
    assert f"not in the Hub cache at {tmp_path / 'empty' / 'hub'} (set by HF_HOME) while" in message
    assert (
        "HF_HUB_OFFLINE is set" in message and "hf download google/ddpm-cifar10-32 --revision v1" in message
    )


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch) -> Path:
    """huggingface_hub in this process, offline with an empty cache (its settings are read at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_loader_and_the_fid_command_go_to_the_hub_for_a_repo_id(offline_empty_cache, tmp_path):
    for load in (ddpm.load_pretrained, unet_from_diffusers, load_for_sampling, local_path):
        with pytest.raises(
            HubError, match=f"Hub model owner/model is not in the Hub cache at {offline_empty_cache}"
        ):
            load("owner/model")
    with pytest.raises(SystemExit) as stop:
        fid_main(["owner/model", str(tmp_path), "--weights", __file__])
    assert "Hub model owner/model is not in the Hub cache" in str(stop.value.code)
    assert "\n" not in str(stop.value.code)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("google/ddpm-cifar10-32", ("google/ddpm-cifar10-32", None)),
        ("google/ddpm-cifar10-32@0123abc", ("google/ddpm-cifar10-32", "0123abc")),
        ("google/ddpm-cifar10-32@refs/pr/1", ("google/ddpm-cifar10-32", "refs/pr/1")),
        ("runs/x/checkpoints", None),  # two slashes: a path
        ("./owner/name", None),
        ("/owner/name", None),
        ("owner/na--me", None),  # not a valid repo name
        ("model", None),  # namespace-less names are local paths here
        (Path("owner/name"), None),  # a Path is always local
    ],
)
def test_what_counts_as_a_repo_id(path, expected):
    assert hub_repo_id(path) == expected


def test_an_existing_local_path_wins_over_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_repo_id("owner/name") is None and local_path("owner/name") == Path("owner/name")


# --- a source is read once, and a path never goes to the Hub ------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """snapshot_download fails the test: nothing may ask the Hub."""

    def asked(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args}")

    monkeypatch.setattr(ddpm.hub, "snapshot_download", asked)


@pytest.mark.parametrize(
    "source",
    ["runs/nonexistent", "runs/x/checkpoints", "./owner/name", "../owner/name", "owner/model.pt", "model"],
)
def test_a_path_that_does_not_exist_is_no_such_file_or_folder_and_the_hub_is_not_asked(
    source, tmp_path, monkeypatch, no_hub
):
    (tmp_path / "cwd" / "runs").mkdir(parents=True)  # runs/ is here, so runs/nonexistent is a path in it
    monkeypatch.chdir(tmp_path / "cwd")
    tried = os.path.abspath(source)
    message = rf"^{re.escape(source)}: no such file or folder \(looked for {re.escape(tried)}; the current "
    message += rf"folder is {re.escape(str(tmp_path / 'cwd'))}\)"
    for load in (ddpm.load_pretrained, load_for_sampling, resolve_source):  # what a model source may be
        with pytest.raises(
            CheckpointError, match=message + r": name a run directory, .* \(`ddpm-train` when installed\)$"
        ):
            load(source)
    for load in (UNet.from_pretrained, unet_from_diffusers, local_path):
        with pytest.raises(FileNotFoundError, match=message + "$"):
            load(source)


def test_sample_py_with_a_mistyped_run_says_no_such_folder_and_asks_the_hub_nothing(tmp_path):
    (tmp_path / "runs").mkdir()
    hub = FakeHub({})
    try:
        args = [str(ROOT / "sample.py"), "--checkpoint", "runs/nonexistent", "--n", "1"]
        done = run(args, {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url}, tmp_path)
    finally:
        hub.stop()
    assert done.returncode == 1 and hub.requests == []
    assert done.stderr == (
        f"error: runs/nonexistent: no such file or folder (looked for {tmp_path}/runs/nonexistent; the "
        f"current folder is {tmp_path}): name a run directory, a checkpoint or model folder, or a Hub "
        "repo id (namespace/name); or train one with `python train.py` (`ddpm-train` when installed)\n"
    )


def test_the_offline_message_names_hf_home_only_when_it_is_set(tmp_path):
    unset = {"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "XDG_CACHE_HOME": None}
    done = run(
        [str(ROOT / "sample.py"), "--checkpoint", "google/ddpm-cifar10-32", "--n", "1"], unset, tmp_path
    )
    assert done.returncode == 1 and "HF_HOME" not in done.stderr, done.stderr
    default = tmp_path / ".cache" / "huggingface" / "hub"
    assert (
        f"is not in the Hub cache at {default} (huggingface_hub's default) while HF_HUB_OFFLINE"
        in done.stderr
    )
    assert (
        f"hf download google/ddpm-cifar10-32` and copy that machine's Hub cache to {default}," in done.stderr
    )


def test_a_hub_repo_is_fetched_once_per_load(hub_cache, monkeypatch):
    """Each loader takes the snapshot once (online, one question to the Hub), however many layers the
    source goes through."""
    home, _ = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    fetched = []

    def counted(*args, **kwargs):
        fetched.append(args[0])
        return snapshot_download(*args, **kwargs)

    monkeypatch.setattr(ddpm.hub, "snapshot_download", counted)
    for load in (load_for_sampling, ddpm.load_pretrained, unet_from_diffusers):
        fetched.clear()
        load(REPO)
        assert fetched == [REPO], load.__name__


# --- the UNet as a Hub model: push_to_hub, then from_pretrained by repo id, online and offline --------------

DIGEST = """
import hashlib, json, torch, ddpm
from ddpm.models import ClassicUNet

def digest(model):
    sha = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        sha.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()
"""

PUSH = """
from PIL import Image

torch.manual_seed(0)
model = ddpm.UNet(base_channels=8, channel_mult=[1, 2], attention_resolutions=[4], image_size=8,
                  norm_groups=4)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
scheduler = ddpm.NoiseScheduler(num_train_timesteps=40, beta_schedule="cosine")
Image.new("RGB", (8, 8), "red").save("grid.png")
sampling = {"sampler": "ddim", "steps": 5, "calls": None, "eta": 0.5, "guidance_scale": 1.0, "options": {}}
url = model.push_to_hub("hub-user/pushed", scheduler=scheduler, sampling=sampling, sample_grid="grid.png")
classic = ClassicUNet(base_channels=4, channel_mult=[1, 2], time_conditioning=True)
classic.push_to_hub("hub-user/classic")
pulled = ddpm.UNet.from_pretrained("hub-user/pushed")  # online: fetched into the cache
ClassicUNet.from_pretrained("hub-user/classic")
sent = {"url": url, "model": digest(model), "classic": digest(classic), "pulled": digest(pulled)}
json.dump({**sent, "schedule": scheduler.config}, open("pushed.json", "w"))
"""

PULL = """
network = ddpm.UNet.from_pretrained("hub-user/pushed")
model, scheduler = ddpm.load_pretrained("hub-user/pushed")
classic = ClassicUNet.from_pretrained("hub-user/classic")
try:
    ddpm.load_pretrained("hub-user/classic")
except ddpm.io.CheckpointError as error:
    refused = str(error)
got = {"network": digest(network), "model": digest(model), "classic": digest(classic), "refused": refused}
json.dump({**got, "schedule": scheduler.config, "training": network.training}, open("pulled.json", "w"))
"""


def test_push_to_hub_then_from_pretrained_by_repo_id_online_and_offline_bit_for_bit(tmp_path):
    hub = FakeHub({})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_stand_in"}
    try:
        pushed = run(DIGEST + PUSH, env, tmp_path)
    finally:
        hub.stop()
    assert pushed.returncode == 0, pushed.stderr
    sent = json.loads((tmp_path / "pushed.json").read_text())
    commit = hub.commits["hub-user/pushed"]
    assert sent["url"] == f"{hub.url}/hub-user/pushed/commit/{commit}" and sent["pulled"] == sent["model"]
    files = hub.repos["hub-user/pushed"]
    assert sorted(files) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "noise_scheduler.json",
        "sample_grid.png",
    ]
    assert json.loads(files["noise_scheduler.json"]) == sent["schedule"]
    assert json.loads(files["config.json"])["class"] == "UNet"
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: ddpm\n") and "# hub-user/pushed" in card
    assert '| `beta_schedule` | `"cosine"` |' in card and "the `ddim` sampler with 5 steps, eta 0.5." in card
    assert "ddpm sample --checkpoint hub-user/pushed --n 16 --sampler ddim --steps 5 --eta 0.5" in card
    assert "![samples](sample_grid.png)" in card and 'ddpm.load_pretrained("hub-user/pushed")' in card
    assert sorted(hub.repos["hub-user/classic"]) == ["README.md", "config.json", "model.safetensors"]

    # offline, the Hub gone: from the cache huggingface_hub wrote
    pulled = run(DIGEST + PULL, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    got = json.loads((tmp_path / "pulled.json").read_text())
    assert got["network"] == got["model"] == sent["model"] and got["classic"] == sent["classic"]
    assert got["schedule"] == sent["schedule"] and got["training"] is False
    assert "has no noise_scheduler.json" in got["refused"]
