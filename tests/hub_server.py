"""A small Hugging Face Hub-protocol server for the tests, as moto is for S3.

No Hub-compatible server installs from the registries here, so the tests run this one on 127.0.0.1 and let the
real ``huggingface_hub`` client talk to it over HTTP. It speaks the subset of the Hub's HTTP API that
``create_repo``, ``upload_folder`` / ``push_to_hub``, ``model_info``, ``list_repo_commits``, ``hf_hub_download``
and ``snapshot_download`` use (routes in ``_Handler.ROUTES``), with the Hub's answers where the client depends
on them: the ``X-Error-Code`` header it maps to ``RepositoryNotFoundError`` and friends, 401 for a token it does
not know, 401 ``RepoNotFound`` for a private repo read without a token, commit ids and ETags in the resolve
headers, and large files through the LFS batch API with a pre-signed upload link that must come without an
``Authorization`` header (as S3 refuses one). Xet is not spoken: clients must run with ``HF_HUB_DISABLE_XET=1``.

Repos live in memory: commits with sha1 ids over their content, the branch ``main``, revisions by branch or
commit id. Use ``with HubServer({"token": "user"}) as hub: ... hub.url ...``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# the initial commit's .gitattributes (what the Hub writes, shortened): these files go through LFS
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.onnx", "*.msgpack")
)
LFS_MIN_SIZE = 10 * 2**20  # larger files go through LFS whatever their name, as on the Hub
INVALID_TOKEN = "Invalid credentials in Authorization header"  # the Hub's message; the client keys on it


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a file's ``oid`` / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The LFS pointer file git stores in place of a large file."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()
        )

    @property
    def oid(self) -> str:
        return git_blob_id(self.pointer if self.lfs else self.content)

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.content), "oid": self.oid}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    parent: str | None
    title: str
    message: str
    author: str
    files: dict[str, Blob]
    changed: list[str]  # paths this commit added, changed or deleted (for the tests to inspect)
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
    id: str = ""

    def __post_init__(self):
        """The commit id: a sha1 over the parent, the message and every file's git object id."""
        listing = "".join(f"{path}\0{blob.oid}\n" for path, blob in sorted(self.files.items()))
        text = f"{self.parent}\n{self.author}\n{self.date}\n{self.title}\n{self.message}\n{listing}"
        self.id = hashlib.sha1(text.encode()).hexdigest()


@dataclass
class Repo:
    id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content uploaded to the signed link

    def add_commit(self, commit: Commit, branch: str = "main") -> str:
        self.commits[commit.id] = commit
        self.branches[branch] = commit.id
        return commit.id

    def resolve(self, revision: str) -> Commit:
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]

    def history(self, revision: str) -> list[Commit]:
        commit, found = self.resolve(revision), []
        while commit is not None:
            found.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return found


class HubError(Exception):
    """An error answer: status, message (JSON ``error`` and ``X-Error-Message``), ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """The server: ``tokens`` maps each accepted token to its user name (its namespace)."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, sent an Authorization header)
        self.lock = threading.Lock()
        self._secret = os.urandom(16)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def sign(self, repo_id: str, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{repo_id}:{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def commits(self, repo_id: str) -> list[Commit]:
        """The history of ``main``, newest first."""
        return self.repos[repo_id].history("main")


def _front_matter(readme: bytes) -> dict | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.decode("utf-8"), flags=re.DOTALL)
    return yaml.safe_load(match.group(1)) if match else None


def _read_chunked(stream) -> bytes:
    body = b""
    while True:
        size = int(stream.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while stream.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return body
        body += stream.read(size)
        stream.readline()


class _Handler(BaseHTTPRequestHandler):
    server_version = "TestHub/1.0"
    REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
    ROUTES = [  # (method, path pattern, handler name)
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
        ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("GET", rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)", "list_commits"),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", rf"/lfs-storage/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_put"),
        ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    def log_message(self, format, *args):  # quiet: pytest shows failures, not every request
        pass

    # ------------------------------------------------------------------ plumbing
    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_GET

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self):
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self._read_body()
        with self.hub.lock:
            self.hub.requests.append((self.command, url.path, "Authorization" in self.headers))
        try:
            for method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, url.path)
                if method == self.command and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    self.user = None if name == "lfs_put" else self._authenticate()
                    with self.hub.lock:
                        status, payload, headers = getattr(self, name)(**params)
                    return self._send(status, payload, headers)
            raise HubError(404, f"no route {self.command} {url.path} in the test hub")
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message}, headers)
        except Exception as err:  # a request this hub cannot take: a 4xx at once (the client retries a 5xx)
            message = f"the test hub failed on {self.command} {url.path}: {err!r}"
            self._send(400, {"error": message}, {"X-Error-Message": message[:200]})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return _read_chunked(self.rfile)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload, headers: dict):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self) -> dict:
        return json.loads(self.body or b"{}")

    def _authenticate(self) -> str | None:
        """The caller's user name, None without a token; 401 for a token the hub does not know."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        user = self.hub.tokens.get(header.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, INVALID_TOKEN)
        return user

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        """The repo, if the caller may read (or ``write``) it; errors as the Hub answers them."""
        repo = self.hub.repos.get(repo_id)
        owner = repo_id.split("/")[0]
        if repo is None or (repo.private and self.user is not None and self.user != owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and self.user is None:
            raise HubError(401, "Repository not found", "RepoNotFound")  # the Hub's answer without a token
        if write and self.user is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if write and self.user != owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ------------------------------------------------------------------ repos
    def create_repo(self):
        request = self._json()
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if request.get("type", "model") != "model":
            raise HubError(400, "the test hub holds model repos only")
        namespace = request.get("organization") or self.user
        if namespace != self.user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{request['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        repo = self.hub.repos[repo_id] = Repo(repo_id, private=request.get("visibility") == "private")
        files = {".gitattributes": Blob(GITATTRIBUTES.encode(), lfs=False)}
        repo.add_commit(Commit(None, "initial commit", "", self.user, files, [".gitattributes"]))
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def validate_yaml(self):
        try:
            _front_matter(self._json()["content"].encode())
        except yaml.YAMLError as err:
            raise HubError(400, f"Invalid YAML in README.md: {err}") from err
        return 200, {"errors": [], "warnings": []}, {}

    def model_info(self, repo, rev="main"):
        repo_obj = self._repo(repo)
        commit = repo_obj.resolve(rev)
        readme = commit.files.get("README.md")
        card = _front_matter(readme.content) if readme else None
        info = {
            "id": repo,
            "author": repo.split("/")[0],
            "sha": commit.id,
            "private": repo_obj.private,
            "lastModified": commit.date,
            "cardData": card,
            "tags": (card or {}).get("tags") or [],
            "siblings": [
                {"rfilename": path, "size": len(blob.content), "blobId": blob.oid, "lfs": self._lfs_info(blob)}
                for path, blob in sorted(commit.files.items())
            ],
        }
        return 200, info, {}

    @staticmethod
    def _lfs_info(blob: Blob) -> dict | None:
        if not blob.lfs:
            return None
        return {"size": len(blob.content), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}

    def tree(self, repo, rev, path=""):
        files = self._repo(repo).resolve(rev).files
        recursive = self.query.get("recursive", "false").lower() in ("true", "1")
        prefix = f"{path.strip('/')}/" if path else ""
        entries, folders = [], set()
        for name, blob in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(blob.tree_entry(name))
        if prefix and not entries and not folders:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        folder_entries = [
            {"type": "directory", "path": f, "oid": git_blob_id(f.encode()), "size": 0} for f in sorted(folders)
        ]
        return 200, folder_entries + entries, {}

    def list_commits(self, repo, rev):
        listing = [
            {"id": c.id, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": c.author}]}
            for c in self._repo(repo).history(rev)
        ]
        return 200, listing, {}

    # ------------------------------------------------------------------ uploads
    def preupload(self, repo, rev):
        head = self._repo(repo, write=True).resolve(rev)
        attributes = head.files.get(".gitattributes")
        patterns = [
            line.split()[0]
            for line in (attributes.content.decode() if attributes else "").splitlines()
            if "filter=lfs" in line
        ]
        answers = []
        for item in self._json()["files"]:
            sample = base64.b64decode(item["sample"])
            basename = item["path"].rsplit("/", 1)[-1]
            lfs = item["size"] >= LFS_MIN_SIZE or b"\0" in sample or any(fnmatch.fnmatch(basename, p) for p in patterns)
            existing = head.files.get(item["path"])
            oid = None if existing is None else existing.sha256 if existing.lfs else existing.oid
            answers.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {"files": answers}, {}

    def lfs_batch(self, repo):
        stored = self._repo(repo, write=True).lfs_objects
        request = self._json()
        if request.get("operation") != "upload":
            raise HubError(400, "the test hub takes LFS uploads only (downloads go through resolve)")
        objects = []
        for obj in request["objects"]:
            oid, size = obj["oid"], obj["size"]
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in stored:  # absent: a pre-signed link to upload to, then verify
                signature = self.hub.sign(repo, oid, size)
                signed = f"{self.hub.url}/lfs-storage/{repo}/{oid}?size={size}&signature={signature}"
                verify = f"{self.hub.url}/{repo}.git/info/lfs/objects/verify"
                answer["actions"] = {"upload": {"href": signed}, "verify": {"href": verify}}
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def lfs_put(self, repo, oid):
        """The storage side of the pre-signed link: the signature is the credential, a token is refused."""
        if "Authorization" in self.headers:
            raise HubError(400, "Only one auth mechanism allowed; the link is pre-signed")
        size = int(self.query.get("size", -1))
        if repo not in self.hub.repos or not hmac.compare_digest(
            self.query.get("signature", ""), self.hub.sign(repo, oid, size)
        ):
            raise HubError(403, "SignatureDoesNotMatch")
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "BadDigest: the content does not match the oid and size it was signed for")
        self.hub.repos[repo].lfs_objects[oid] = self.body
        return 200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'}

    def lfs_verify(self, repo):
        request = self._json()
        content = self._repo(repo, write=True).lfs_objects.get(request["oid"])
        if content is None or len(content) != request["size"]:
            raise HubError(404, f"LFS object {request['oid']} was not uploaded")
        return 200, {"message": "ok"}, {}

    def commit(self, repo, rev):
        repo_obj = self._repo(repo, write=True)
        if self.query.get("create_pr"):
            raise HubError(400, "the test hub does not open pull requests")
        if rev not in repo_obj.branches:
            raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
        head = repo_obj.resolve(rev)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        if header.get("parentCommit") not in (None, repo_obj.branches[rev]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, changed = dict(head.files), []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = repo_obj.lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                files[value["path"]] = Blob(content, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key != "header":
                raise HubError(400, f"unknown commit operation {key!r}")
            if key != "header":
                changed.append(value["path"])
        commit = Commit(head.id, header.get("summary", ""), header.get("description", ""), self.user, files, changed)
        sha = repo_obj.add_commit(commit, rev)
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}"}, {}

    # ------------------------------------------------------------------ downloads
    def resolve(self, repo, rev, path):
        repo_obj = self._repo(repo)
        commit = repo_obj.resolve(rev)
        blob = commit.files.get(path)
        if blob is None:  # the commit id tells the client to cache the file's absence
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{blob.oid}"', "Content-Type": "application/octet-stream"}
        if blob.lfs:  # the Hub would redirect to its CDN; the linked headers describe the large file itself
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
        return 200, blob.content, headers


# ---------------------------------------------------------------------------------------- the client's side
def client_env(url: str, home, token: str | None) -> dict[str, str]:
    """Environment for a fresh interpreter whose hub client talks to the test hub at ``url``.

    ``HF_ENDPOINT`` and friends are read when huggingface_hub (and diffusers, transformers) are imported, so a
    child process gets them before any import. Xet is off: the test hub speaks LFS only.
    """
    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(Path(home) / "hub"),
        "HF_MODULES_CACHE": str(Path(home) / "modules"),
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def point_client_at(monkeypatch, url: str, home, token: str | None) -> None:
    """Point this process's already imported huggingface_hub at the test hub (undone with ``monkeypatch``).

    What the client read at import time is patched too: the endpoint and the resolve-URL template in
    ``constants``, the shared ``HfApi`` behind ``huggingface_hub.create_repo`` / ``upload_folder`` / ``model_info``
    (diffusers imports those), offline mode and Xet (the test suite runs with ``HF_HUB_OFFLINE=1``), and the cache
    and token paths (so the user's own token and cache are never read).
    """
    from huggingface_hub import constants, hf_api

    home = Path(home)
    for name, value in client_env(url, home, token).items():
        monkeypatch.setenv(name, value)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    patches = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
