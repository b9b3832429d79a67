"""A fake Hugging Face Hub on 127.0.0.1 for tests (standard library only, in-memory storage).

It speaks enough of the real Hub HTTP protocol for the real `huggingface_hub` client (create_repo,
upload_folder/create_commit with regular and LFS files, list_repo_commits, list_repo_tree, repo_info,
hf_hub_download, snapshot_download) and for `datasets.load_dataset("user/name", "config")`.

    with FakeHub() as hub:
        env = {**os.environ, **hub.env()}  # HF_ENDPOINT, HF_TOKEN, Xet off, offline off
        subprocess.run([sys.executable, "-c", "..."], env=env, check=True)
        hub.commits("user/name"); hub.files("user/name"); hub.repo_info("user/name")["private"]

Like the Hub, create_repo makes an initial commit holding `.gitattributes`, and the preupload
endpoint returns each existing file's oid, so the client skips unchanged files (and empty commits).
Write endpoints need `Authorization: Bearer <token>`; private repos are invisible without it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socketserver
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_GITATTRIBUTES = b"".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for ext in ("arrow", "bin", "gz", "npy", "parquet", "pt", "safetensors", "zip", "zst")
)
_LFS_SUFFIXES = tuple(line.split()[0][1:].decode() for line in _GITATTRIBUTES.splitlines())
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            409: "Conflict", 412: "Precondition Failed", 416: "Range Not Satisfiable", 422: "Unprocessable Entity"}


# What the Hub's /api/validate-yaml accepts, written out here and not imported from the code under test, so a
# card the Hub would reject fails the test. Licences: a subset of the Hub's ids.
_HUB_LICENCES = frozenset({"apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0",
                           "cc0-1.0", "odc-by", "odbl", "gpl-3.0", "bsd-3-clause", "llama3.1", "other", "unknown"})
_HUB_SIZES = frozenset({"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                        "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T"})


def _card_errors(content: str) -> list[str]:
    """The Hub's checks of a dataset card's metadata that this fake knows: licence, size bucket, configs."""
    import yaml

    if not content.startswith("---\n") or "\n---" not in content[3:]:
        return ["the card has no YAML metadata block"]
    meta = yaml.safe_load(content[4:content.index("\n---", 3)]) or {}
    listed = lambda key: [meta[key]] if isinstance(meta.get(key), str) else meta.get(key) or []  # noqa: E731
    errors = [f'"license" must be one of the Hub licence ids, got {v!r}' for v in listed("license") if v not in _HUB_LICENCES]
    errors += [f'"size_categories" must be one of the Hub buckets, got {v!r}' for v in listed("size_categories")
               if v not in _HUB_SIZES]
    if "other" in listed("license") and not (meta.get("license_name") and meta.get("license_link")):
        errors.append('"license: other" needs "license_name" and "license_link"')
    for c in meta.get("configs") or []:
        if not c.get("config_name") or not c.get("data_files"):
            errors.append(f'each of "configs" needs "config_name" and "data_files", got {c!r}')
    return errors


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class _Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:  # git blob sha1 of what git stores: the content, or the LFS pointer
        stored = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    @property
    def etag(self) -> str:  # what the client compares with its own oid: sha256 for LFS, git sha1 otherwise
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str = field(default_factory=_now)
    commits: list[dict] = field(default_factory=list)  # oldest first; each holds a full `files` snapshot

    def add_commit(self, title: str, message: str, files: dict[str, _Blob], author: str) -> dict:
        commit = {"id": secrets.token_hex(20), "title": title, "message": message, "date": _now(),
                  "authors": [{"user": author}], "files": files}
        self.commits.append(commit)
        return commit

    def find(self, rev: str) -> dict | None:
        if rev in ("main", "HEAD", "refs/heads/main"):
            return self.commits[-1]
        return next((c for c in reversed(self.commits) if len(rev) >= 7 and c["id"].startswith(rev)), None)

    def last_change(self, path: str, upto: dict) -> dict:
        """The newest commit up to `upto` that changed `path`."""
        history = self.commits[: self.commits.index(upto) + 1]
        for newer, older in zip(reversed(history), list(reversed(history))[1:]):
            if newer["files"].get(path) != older["files"].get(path):
                return newer
        return history[0]


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True
    block_on_close = False
    hub: FakeHub

    def server_bind(self) -> None:  # skip getfqdn(): a reverse-DNS lookup that can stall offline
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet; never echo request headers
        pass

    def do_GET(self) -> None:
        self._dispatch(self.command)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status, _REASONS.get(status))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))  # for HEAD too: the size of what GET would send
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), content_type=content_type)

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        auth = self.headers.get("Authorization")
        url = urlsplit(self.path)
        with hub._lock:
            hub.requests_seen.append(f"{method} {url.path}")
            if auth is not None:
                hub.auth_headers_seen.append(auth)
        self.authorized = auth == f"Bearer {hub.token}"
        self.query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]  # a quoted revision stays one segment
        body = self._body()  # always drained, so a kept-alive connection stays in step
        try:
            with hub._lock:
                hub._route(self, method, parts, body)
        except _HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers)

    def require_auth(self) -> None:
        if self.headers.get("Authorization") is None:
            raise _HubError(401, "Authorization header is required")
        if not self.authorized:
            raise _HubError(401, "Invalid credentials in Authorization header")


class FakeHub:
    """A Hub server on 127.0.0.1:<free port>; see the module docstring."""

    username = "user"

    def __init__(self, token: str = "hf_test_token", card_rules: Sequence[Callable[[str], list[str]]] = ()) -> None:
        self.token = token
        # More checks of /api/validate-yaml (a card's text -> its errors): the real Hub's rules this fake lacks.
        self.card_rules = tuple(card_rules)
        self.url = ""
        self.auth_headers_seen: list[str] = []  # every Authorization value received, in order
        self.requests_seen: list[str] = []  # "METHOD /path" (no query, no headers), in order
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs: dict[str, bytes] = {}  # sha256 -> content, once uploaded and verified
        self._pending: set[str] = set()  # oids a write-authorized batch call handed an upload href for
        self._lock = threading.RLock()
        self._server: _HTTPServer | None = None

    # -- lifecycle and inspection ----------------------------------------------------------------
    def start(self) -> FakeHub:
        self._server = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Variables for a client process; the offline switches are turned off since tests set them on.

        Xet is turned off: with hf_xet installed the client's default upload is Xet (a write token from the Hub,
        then content-defined chunks, xorbs and shards sent by hf_xet's Rust client to a CAS server), a protocol
        this standard-library fake does not emulate. With it off the client takes the LFS path (preupload, LFS
        batch, PUT, commit), which tests/test_fake_hub.py asserts was taken."""
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": self.token, "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0",
                "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "NO_PROXY": "127.0.0.1,localhost"}

    def commits(self, repo_id: str, repo_type: str = "dataset") -> list[dict]:
        """Newest first, as the Hub lists them: id, title, message, date, authors."""
        with self._lock:
            return [{k: v for k, v in c.items() if k != "files"} for c in reversed(self._get(repo_type, repo_id).commits)]

    def files(self, repo_id: str, repo_type: str = "dataset") -> dict[str, bytes]:
        with self._lock:
            return {path: blob.data for path, blob in self._get(repo_type, repo_id).commits[-1]["files"].items()}

    def repo_info(self, repo_id: str, repo_type: str = "dataset") -> dict:
        with self._lock:
            repo = self._get(repo_type, repo_id)
            return self._info(repo, repo.commits[-1])

    # -- routes ----------------------------------------------------------------------------------
    def _get(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _route(self, h: _Handler, method: str, parts: list[str], body: bytes) -> None:
        if parts[:2] == ["api", "whoami-v2"]:
            h.require_auth()
            return h._json({"type": "user", "name": self.username, "fullname": self.username, "orgs": [],
                            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            content = json.loads(body)["content"]
            errors = _card_errors(content) + [e for rule in self.card_rules for e in rule(content)]
            if errors:  # the Hub answers 400 with the errors; DatasetCard.validate raises them as a ValueError
                raise _HubError(400, "; ".join(errors))
            return h._json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "repos"] and method in ("POST", "DELETE"):
            h.require_auth()
            payload = json.loads(body or b"{}")
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or self.username}/{payload['name']}"
            if parts[2:] == ["delete"]:
                self._get(repo_type, repo_id)
                del self._repos[(repo_type, repo_id)]
                return h._json({})
            url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
            if (repo_type, repo_id) in self._repos:  # exist_ok=True reads `url` from this body
                raise _HubError(409, f"You already created this {repo_type} repo", url=url)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = self._repos[(repo_type, repo_id)] = _Repo(repo_type, repo_id, private)
            repo.add_commit("initial commit", "", {".gitattributes": _Blob(_GITATTRIBUTES, False)}, self.username)
            return h._json({"url": url, "name": repo_id, "id": repo_id})
        if parts[0] == "lfs-upload" and len(parts) == 2 and method == "PUT":
            return self._lfs_put(h, parts[1], body)
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in _TYPES:  # /api/{type}s/{ns}/{name}/...
            repo = self._readable(h, _TYPES[parts[1]], f"{parts[2]}/{parts[3]}")
            return self._api(h, method, repo, parts[4:], body)
        repo_type = _TYPES.get(parts[0], "model")
        rest = parts[1:] if parts[0] in _TYPES else parts
        if len(rest) >= 2 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            repo = self._readable(h, repo_type, f"{rest[0]}/{rest[1][:-4]}")
            return self._lfs_batch(h, repo, json.loads(body))
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(h, self._readable(h, repo_type, f"{rest[0]}/{rest[1]}"), rest[3], "/".join(rest[4:]))
        raise _HubError(404, f"fake hub: no route for {method} /{'/'.join(parts)}")

    def _readable(self, h: _Handler, repo_type: str, repo_id: str) -> _Repo:
        repo = self._get(repo_type, repo_id)
        if repo.private and not h.authorized:  # the Hub hides private repos behind 401 RepoNotFound
            raise _HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: _Repo, rev: str) -> dict:
        commit = repo.find(rev)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _api(self, h: _Handler, method: str, repo: _Repo, rest: list[str], body: bytes) -> None:
        action, rev = (rest[0], rest[1]) if len(rest) >= 2 else (rest[0] if rest else "", "main")
        if method == "GET" and action in ("", "revision"):
            return h._json(self._info(repo, self._commit_of(repo, rev)))
        if method == "GET" and action == "commits":
            upto = repo.commits.index(self._commit_of(repo, rev))
            return h._json([{k: v for k, v in c.items() if k != "files"} for c in reversed(repo.commits[: upto + 1])])
        if method == "GET" and action == "tree":
            commit = self._commit_of(repo, rev)
            return h._json(self._tree(repo, commit, "/".join(rest[2:]).strip("/"), h.query.get("recursive") in (["1"], ["true"], ["True"])))
        if method == "POST" and action == "paths-info":
            commit = self._commit_of(repo, rev)
            form = json.loads(body) if body.startswith(b"{") else parse_qs(body.decode())
            paths = [form["paths"]] if isinstance(form.get("paths"), str) else form.get("paths", [])
            entries = [e for p in paths for e in self._tree(repo, commit, "", True, p.strip("/"))]
            return h._json(entries)
        if method == "POST" and action == "preupload":
            h.require_auth()
            files = self._commit_of(repo, rev)["files"]
            out = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f.get("sample", ""))
                lfs = f["path"].endswith(_LFS_SUFFIXES) or b"\0" in sample or f["size"] > 10_000_000
                existing = files.get(f["path"])
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": existing.etag if existing else None})
            return h._json({"files": out})
        if method == "POST" and action == "commit":
            h.require_auth()
            return h._json(self._commit(h, repo, rev, body))
        raise _HubError(404, f"fake hub: no API route for {method} {action}")

    def _info(self, repo: _Repo, commit: dict) -> dict:
        siblings = [{"rfilename": p, "size": len(b.data), "blobId": b.git_oid,
                     **({"lfs": {"sha256": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}} if b.lfs else {})}
                    for p, b in sorted(commit["files"].items())]
        return {"_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit["id"],
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "createdAt": repo.created_at, "lastModified": repo.commits[-1]["date"], "siblings": siblings}

    def _tree(self, repo: _Repo, commit: dict, folder: str, recursive: bool, exact: str | None = None) -> list[dict]:
        """Entries under `folder` (or the single entry at `exact`, file or folder, for paths-info)."""
        files: dict[str, _Blob] = commit["files"]
        dirs = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
        if exact is not None:
            chosen = {exact} & (set(files) | dirs)
        else:
            if folder and folder not in dirs:
                raise _HubError(404, f"{folder} does not exist on main", "EntryNotFound")
            under = [p for p in sorted(set(files) | dirs) if not folder or p.startswith(folder + "/")]
            chosen = {p for p in under if recursive or "/" not in p[len(folder) + 1 if folder else 0:]}
        entries = []
        for path in sorted(chosen):
            last = repo.last_change(path, commit) if path in files else commit
            last_commit = {"id": last["id"], "title": last["title"], "date": last["date"]}
            if path in dirs:
                oid = hashlib.sha1(json.dumps(sorted(p for p in files if p.startswith(path + "/"))).encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": path, "lastCommit": last_commit})
                continue
            b = files[path]
            entry = {"type": "file", "oid": b.git_oid, "size": len(b.data), "path": path, "lastCommit": last_commit}
            if b.lfs:
                entry["lfs"] = {"oid": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}
            entries.append(entry)
        return entries

    def _lfs_batch(self, h: _Handler, repo: _Repo, payload: dict) -> None:
        h.require_auth()
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self._lfs:  # already stored: no actions, the client skips the upload
                self._pending.add(obj["oid"])
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        h._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, h: _Handler, oid: str, body: bytes) -> None:
        # Like a presigned URL: only valid after an authorized batch call, and for as long as it lives, so two files
        # of one commit with the same content (two curated sets holding the same rows) may both PUT it.
        if oid not in self._pending and oid not in self._lfs:
            raise _HubError(401, "no upload was granted for this object")
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, "uploaded content does not match its sha256")
        self._lfs[oid] = body
        self._pending.discard(oid)
        h._send(200, b"")

    def _commit(self, h: _Handler, repo: _Repo, rev: str, body: bytes) -> dict:
        if h.query.get("create_pr"):
            raise _HubError(400, "fake hub: pull requests are not supported")
        head = self._commit_of(repo, rev)
        if head is not repo.commits[-1]:
            raise _HubError(400, "fake hub: commits go to the branch head (main) only")
        files = dict(head["files"])
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent and parent != head["id"]:
                    raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = _Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if value["oid"] not in self._lfs:
                    raise _HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = _Blob(self._lfs[value["oid"]], True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise _HubError(400, f"fake hub: unsupported commit operation {key}")
        commit = repo.add_commit(header.get("summary", ""), header.get("description", ""), files, self.username)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return {"success": True, "commitOid": commit["id"], "pullRequestUrl": None,
                "commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{commit['id']}"}

    def _resolve(self, h: _Handler, repo: _Repo, rev: str, path: str) -> None:
        commit = self._commit_of(repo, rev)
        blob = commit["files"].get(path)
        if blob is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data, headers = blob.data, {"X-Repo-Commit": commit["id"], "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(data))})
        spec = h.headers.get("Range", "")
        if spec.startswith("bytes=") and "," not in spec:
            first, _, last = spec[6:].partition("-")
            start, end = (len(data) - int(last), len(data) - 1) if not first else (int(first), int(last or len(data) - 1))
            start, end = max(start, 0), min(end, len(data) - 1)
            if start > end:
                raise _HubError(416, "range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return h._send(206, data[start : end + 1], headers, "application/octet-stream")
        h._send(200, data, headers, "application/octet-stream")
