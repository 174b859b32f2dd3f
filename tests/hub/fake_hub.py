"""A small Hugging Face Hub on loopback, for testing pushes and downloads with the real `huggingface_hub` client.

It implements what the client calls for `create_repo`, `create_branch`/`delete_branch`, `create_commit` (preupload,
LFS batch and basic upload, NDJSON commit), `/api/validate-yaml`, `repo_info`/`model_info`, `list_repo_tree` and file downloads
(`resolve`, with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`/`X-Linked-Size` and ranges), in memory, with bearer-token
auth and fault injection. It never touches the network beyond 127.0.0.1 and stops itself after `max_lifetime`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"
_DATE = "2025-01-01T00:00:00.000Z"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool = False

    @property
    def oid(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_sha1(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict = field(default_factory=dict)  # branch -> commit sha
    commits: dict = field(default_factory=dict)  # sha -> {path: Blob}
    log: list = field(default_factory=list)  # (sha, branch, summary, [paths added], [paths deleted])

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def files(self, revision: str = "main") -> dict:
        sha = self.resolve(revision)
        return {} if sha is None else self.commits[sha]


class FakeHub:
    """In-memory Hub. `tokens` maps a token to the user it authenticates (who may write to its own namespace)."""

    def __init__(self, tokens: Optional[dict] = None, lfs_patterns: tuple = (), max_lifetime: float = 120.0):
        self.tokens = dict(tokens or {"good-token": "tester"})
        self.lfs_patterns = tuple(lfs_patterns)
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, Optional[str]]] = []  # (method, path, token)
        self._failures: list[list] = []  # [method, regex, status, remaining]
        self._lock = threading.RLock()
        self._max_lifetime = max_lifetime
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._url = ""
        self._watchdog: Optional[threading.Timer] = None

    # ----- lifecycle ------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._url

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self._max_lifetime, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        server, self._server = self._server, self._server and None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ----- test helpers ---------------------------------------------------------------------------------------------
    def fail(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """The next `times` requests matching `method` and `path_regex` get HTTP `status`."""
        with self._lock:
            self._failures.append([method, re.compile(path_regex), status, times])

    def commits(self, repo_id: str) -> list:
        return list(self.repos[repo_id].log) if repo_id in self.repos else []

    def files(self, repo_id: str, revision: str = "main") -> dict:
        return {p: b.data for p, b in self.repos[repo_id].files(revision).items()}

    def create(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        sha = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        repo.commits[sha] = {".gitattributes": Blob(GITATTRIBUTES)}
        repo.branches["main"] = sha
        repo.log.append((sha, "main", "initial commit", [".gitattributes"], []))
        self.repos[repo_id] = repo
        return repo

    def _injected(self, method: str, path: str) -> Optional[int]:
        with self._lock:
            for failure in self._failures:
                if failure[0] == method and failure[1].search(path) and failure[3] > 0:
                    failure[3] -= 1
                    return failure[2]
        return None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(/(?P<path>.*))?$"), "tree"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("DELETE", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "delete_branch"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/_lfs/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 15  # a stuck client cannot hold a server thread forever

    def log_message(self, *args) -> None:  # quiet
        pass

    # ----- plumbing -------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _token(self) -> Optional[str]:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _user(self, required: bool) -> Optional[str]:
        token = self._token()
        if token is None:
            if required:
                raise _HTTPError(401, "You must be authenticated to access this resource.")
            return None
        if token not in self.fake.tokens:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return self.fake.tokens[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.fake.repos.get(repo_id)
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise _HTTPError(404 if user else 401, "Repository not found", "RepoNotFound")
        if write and user != repo_id.split("/")[0]:
            raise _HTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _dispatch(self) -> None:
        if not self.fake.running:  # stopped: behave like a server that is gone (kept-alive connections included)
            self.close_connection = True
            return
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._body() if self.command in ("POST", "PUT") else b""
        self.fake.requests.append((self.command, path, self._token()))
        try:
            status = self.fake._injected(self.command, path)
            if status is not None:
                raise _HTTPError(status, f"Injected failure ({status})")
            for method, pattern, name in _ROUTES:
                match = pattern.match(path)
                if method == self.command and match:
                    groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.fake._lock:
                        return getattr(self, "_" + name)(body=body, query=query, **groups)
            raise _HTTPError(404, f"No route for {self.command} {path}")
        except _HTTPError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message, **err.extra}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # ----- endpoints ------------------------------------------------------------------------------------------------
    def _create_repo(self, body, query):
        user = self._user(required=True)
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if repo_id.split("/")[0] != user:
            raise _HTTPError(403, f"You don't have the rights to create a model under the namespace {repo_id}")
        if repo_id in self.fake.repos:
            raise _HTTPError(409, "You already created this model repo", url=f"{self.fake.url}/{repo_id}")
        private = payload.get("private", payload.get("visibility") == "private")
        self.fake.create(repo_id, private=bool(private))
        self._json(200, {"url": f"{self.fake.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body, query):
        from huggingface_hub import ModelCard

        try:
            ModelCard(json.loads(body)["content"], ignore_metadata_errors=False)
        except Exception as err:  # noqa: BLE001 - reported to the client like the Hub does
            return self._json(400, {"errors": [{"message": str(err)}]})
        self._json(200, {"warnings": []})

    def _whoami(self, body, query):
        user = self._user(required=True)
        self._json(200, {"type": "user", "name": user, "auth": {"type": "access_token"}})

    def _repo_info(self, body, query, repo, rev="main"):
        r = self._repo(repo)
        sha = r.resolve(rev)
        if sha is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        self._json(200, {
            "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha, "private": r.private,
            "lastModified": _DATE, "createdAt": _DATE, "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": p} for p in sorted(r.commits[sha])],
        })

    def _tree(self, body, query, repo, rev, path=""):
        r = self._repo(repo)
        sha = r.resolve(rev)
        if sha is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        entries = []
        for p, blob in sorted(r.commits[sha].items()):
            if path and not p.startswith(path.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": p, "size": len(blob.data), "oid": git_sha1(blob.data)}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.oid, "size": len(blob.data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def _create_branch(self, body, query, repo, rev):
        r = self._repo(repo, write=True)
        if rev in r.branches:
            raise _HTTPError(409, f"Reference already exists: {rev}")
        payload = json.loads(body or b"{}")
        start = r.resolve(payload.get("startingPoint") or "main")
        if start is None:
            raise _HTTPError(404, "Invalid starting point", "RevisionNotFound")
        r.branches[rev] = start
        self._json(200, {})

    def _delete_branch(self, body, query, repo, rev):
        r = self._repo(repo, write=True)
        if r.branches.pop(rev, None) is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        self._json(200, {})

    def _preupload(self, body, query, repo, rev):
        r = self._repo(repo, write=True)
        head = r.files(rev)
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["size"] > 0 and any(fnmatch.fnmatch(f["path"], p) for p in self.fake.lfs_patterns)
            existing = head.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": existing.oid if existing is not None and existing.lfs == lfs else None})
        self._json(200, {"files": files, "commitOid": r.resolve(rev)})

    def _lfs_batch(self, body, query, repo):
        self._repo(repo, write=True)
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.fake.lfs_store:
                entry["actions"] = {"upload": {"href": f"{self.fake.url}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, body, query, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HTTPError(400, "sha256 mismatch")
        self.fake.lfs_store[oid] = body
        self._json(200, {})

    def _commit(self, body, query, repo, rev):
        r = self._repo(repo, write=True)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "The first line must be the commit header")
        header = lines[0]["value"]
        parent = r.resolve(rev)
        if parent is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = dict(r.commits[parent])
        added, deleted = [], []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]))
                added.append(value["path"])
            elif key == "lfsFile":
                data = self.fake.lfs_store.get(value["oid"])
                if data is None:
                    raise _HTTPError(422, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = Blob(data, lfs=True)
                added.append(value["path"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
                deleted.append(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                for p in gone:
                    del files[p]
                deleted.extend(gone)
            else:
                raise _HTTPError(400, f"Unknown commit operation {key!r}")
        sha = hashlib.sha1(json.dumps([parent, header, added, deleted]).encode()
                           + str(len(r.log)).encode()).hexdigest()
        r.commits[sha] = files
        pr_url = None
        branch = rev
        if query.get("create_pr") == ["1"]:
            number = 1 + sum(b.startswith("refs/pr/") for b in r.branches)
            branch = f"refs/pr/{number}"
            pr_url = f"{self.fake.url}/{repo}/discussions/{number}"
        r.branches[branch] = sha
        r.log.append((sha, branch, header.get("summary"), added, deleted))
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.fake.url}/{repo}/commit/{sha}",
                         "pullRequestUrl": pr_url, "hookOutput": ""})

    def _resolve(self, body, query, repo, rev, path):
        r = self._repo(repo)
        sha = r.resolve(rev)
        if sha is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        blob = r.commits[sha].get(path)
        if blob is None:
            raise _HTTPError(404, f"Entry not found: {path}", "EntryNotFound")
        data, status = blob.data, 200
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_sha1(blob.data)}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.oid}"', "X-Linked-Size": str(len(blob.data))})
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if match and self.command == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")
