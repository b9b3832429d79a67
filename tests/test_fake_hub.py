"""The fake Hub against the real `huggingface_hub` and `datasets` clients, over 127.0.0.1 only.

Client steps that must see a fresh environment (endpoint, token, caches: the libraries read some of
them at import time) run in a subprocess with `hub.env()`; quick checks patch the constants in-process.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_hub import FakeHub

README = """\
---
configs:
- config_name: process
  data_files:
  - split: train
    path: data/process/train-*.parquet
- config_name: none
  data_files:
  - split: train
    path: data/none/train-*.parquet
---
# SWiRL test data
"""
PROCESS_ROWS = [{"question": "2+2?", "step": 0, "reward": 1.0}, {"question": "capital of France?", "step": 1, "reward": 0.5}]
NONE_ROWS = [{"question": "3*3?", "step": 0, "reward": 0.0}]
# huggingface_hub itself PUTs in-memory LFS bytes with httpx2's deprecated `data=`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


def _write_folder(folder: Path) -> Path:
    (folder / "data" / "process").mkdir(parents=True)
    (folder / "data" / "none").mkdir(parents=True)
    (folder / "README.md").write_text(README)
    pq.write_table(pa.Table.from_pylist(PROCESS_ROWS), folder / "data" / "process" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(NONE_ROWS), folder / "data" / "none" / "train-00000-of-00001.parquet")
    return folder


def _client(hub: FakeHub, home: Path, code: str, token: str | None = None) -> dict:
    """Run `code` in a fresh interpreter pointed at the hub with empty caches; it must print one JSON line last."""
    env = {**os.environ, **hub.env(), "HF_HOME": str(home / "hf"), "HF_DATASETS_CACHE": str(home / "datasets")}
    if token is not None:
        env["HF_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _request(hub: FakeHub, method: str, path: str, body: bytes = b"", token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(hub.url + path, data=body or None, method=method, headers=headers or {})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def in_process_client(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point the already-imported huggingface_hub at the hub (its constants were read at import)."""
    from huggingface_hub import constants

    for key, value in hub.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # no Xet CAS here: see FakeHub.env
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=hub.token)


def test_upload_folder_then_load_dataset_in_fresh_process(hub: FakeHub, tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "folder")
    seen_before = len(hub.auth_headers_seen)
    up = _client(hub, tmp_path / "uploader", f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("user/e2e", repo_type="dataset", private=True)
        api.create_repo("user/e2e", repo_type="dataset", private=True, exist_ok=True)  # 409, tolerated
        info = api.upload_folder(folder_path={str(folder)!r}, repo_id="user/e2e", repo_type="dataset", commit_message="Publish")
        print(json.dumps({{"oid": info.oid, "whoami": api.whoami()["name"]}}))
    """)
    assert up["whoami"] == "user"
    commits = hub.commits("user/e2e")
    assert [c["title"] for c in commits] == ["Publish", "initial commit"]  # create_repo commits .gitattributes
    assert up["oid"] == commits[0]["id"] == hub.repo_info("user/e2e")["sha"]
    assert hub.repo_info("user/e2e")["private"] is True
    files = hub.files("user/e2e")
    assert sorted(files) == [".gitattributes", "README.md", "data/none/train-00000-of-00001.parquet",
                             "data/process/train-00000-of-00001.parquet"]
    assert files["README.md"] == README.encode()
    assert files["data/process/train-00000-of-00001.parquet"] == (folder / "data/process/train-00000-of-00001.parquet").read_bytes()
    assert any(r.startswith("PUT /lfs-upload/") for r in hub.requests_seen)  # parquet went through LFS

    down = _client(hub, tmp_path / "downloader", """
        import json, datasets
        process = datasets.load_dataset("user/e2e", "process", split="train")
        none = datasets.load_dataset("user/e2e", "none", split="train")
        print(json.dumps({"process": process.to_list(), "none": none.to_list()}))
    """)
    assert down == {"process": PROCESS_ROWS, "none": NONE_ROWS}
    assert set(hub.auth_headers_seen[seen_before:]) == {f"Bearer {hub.token}"}  # both processes used HF_TOKEN


def test_unchanged_reupload_skips_commit(hub: FakeHub, tmp_path: Path) -> None:
    """Documents the real client: the preupload answer carries each remote file's oid, the client drops
    unchanged files and, with nothing left, makes no commit and returns the current head. It still asks
    the LFS batch endpoint about the parquet files; the Hub already has them, so nothing is PUT."""
    folder = _write_folder(tmp_path / "folder")
    code = f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("user/again", repo_type="dataset", exist_ok=True)
        oids = [api.upload_folder(folder_path={str(folder)!r}, repo_id="user/again", repo_type="dataset").oid]
        oids.append(api.upload_folder(folder_path={str(folder)!r}, repo_id="user/again", repo_type="dataset").oid)
        print(json.dumps({{"oids": oids, "commits": len(api.list_repo_commits("user/again", repo_type="dataset"))}}))
    """
    out = _client(hub, tmp_path / "client", code)
    assert out["oids"][0] == out["oids"][1] == hub.repo_info("user/again", "dataset")["sha"]
    assert out["commits"] == len(hub.commits("user/again")) == 2  # initial commit + the first upload only
    first_commit = hub.requests_seen.index("POST /api/datasets/user/again/commit/main")
    second_round = hub.requests_seen[first_commit + 1:]
    assert "POST /api/datasets/user/again/preupload/main" in second_round
    assert "POST /datasets/user/again.git/info/lfs/objects/batch" in second_round
    assert not any(r.startswith("PUT ") or r.endswith("/commit/main") for r in second_round)

    (folder / "README.md").write_text(README + "\nEdited.\n")  # one changed file: a commit with just that file
    _client(hub, tmp_path / "client2", code)
    assert len(hub.commits("user/again")) == 3
    assert hub.files("user/again")["README.md"].endswith(b"Edited.\n")


def test_commits_tree_download_in_process(hub: FakeHub, in_process_client, tmp_path: Path) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    api = in_process_client
    api.create_repo("user/inproc", repo_type="dataset", private=False)
    api.create_commit("user/inproc", repo_type="dataset", commit_message="add", operations=[
        CommitOperationAdd("README.md", README.encode()),
        CommitOperationAdd("data/x/a.bin", b"\0binary" * 10),
    ])
    api.create_commit("user/inproc", repo_type="dataset", commit_message="remove",
                      operations=[CommitOperationDelete("data/x/a.bin")])
    commits = api.list_repo_commits("user/inproc", repo_type="dataset")
    assert [c.title for c in commits] == ["remove", "add", "initial commit"]
    assert [c.commit_id for c in commits] == [c["id"] for c in hub.commits("user/inproc")]
    assert api.dataset_info("user/inproc").private is False

    path = hf_hub_download("user/inproc", "README.md", repo_type="dataset", cache_dir=tmp_path / "cache")
    assert Path(path).read_text() == README
    old = api.list_repo_tree("user/inproc", repo_type="dataset", revision=commits[1].commit_id, recursive=True)
    assert {e.path: getattr(e, "lfs", None) is not None for e in old} == {
        ".gitattributes": False, "README.md": False, "data": False, "data/x": False, "data/x/a.bin": True}
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("user/inproc", path_in_repo="data", repo_type="dataset"))


def test_write_endpoints_need_the_right_token(hub: FakeHub, in_process_client) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    in_process_client.create_repo("user/locked", repo_type="dataset", private=True)
    body = json.dumps({"name": "other", "organization": "user", "type": "dataset"}).encode()
    assert _request(hub, "POST", "/api/repos/create", body, token="hf_wrong")[0] == 401
    assert _request(hub, "POST", "/api/repos/create", body)[0] == 401
    commit = b'{"key": "header", "value": {"summary": "x", "description": ""}}\n'
    assert _request(hub, "POST", "/api/datasets/user/locked/commit/main", commit, token="hf_wrong")[0] == 401
    assert "Bearer hf_wrong" in hub.auth_headers_seen
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong").create_repo("user/other", repo_type="dataset")
    assert err.value.response.status_code == 401
    assert len(hub.commits("user/locked")) == 1

    status, headers, _ = _request(hub, "GET", "/api/datasets/user/locked")  # private: hidden without the token
    assert (status, headers.get("X-Error-Code")) == (401, "RepoNotFound")
    assert _request(hub, "GET", "/api/datasets/user/locked", token=hub.token)[0] == 200


def test_resolve_headers_and_ranges(hub: FakeHub, in_process_client) -> None:
    from huggingface_hub import CommitOperationAdd

    data = bytes(range(256)) * 4
    in_process_client.create_repo("user/ranges", repo_type="dataset")
    in_process_client.create_commit("user/ranges", repo_type="dataset", commit_message="blob",
                                    operations=[CommitOperationAdd("blob.parquet", data)])
    head = hub.repo_info("user/ranges")["sha"]
    status, headers, _ = _request(hub, "HEAD", "/datasets/user/ranges/resolve/main/blob.parquet")
    assert status == 200 and headers["X-Repo-Commit"] == head and headers["X-Linked-Size"] == str(len(data))
    assert headers["X-Linked-Etag"].strip('"') == hashlib.sha256(data).hexdigest()
    status, headers, body = _request(hub, "GET", "/datasets/user/ranges/resolve/main/blob.parquet",
                                     headers={"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    assert _request(hub, "GET", "/datasets/user/ranges/resolve/main/blob.parquet", headers={"Range": "bytes=-5"})[2] == data[-5:]
    status, headers, _ = _request(hub, "GET", "/datasets/user/ranges/resolve/main/missing.txt")
    assert (status, headers.get("X-Error-Code")) == (404, "EntryNotFound")


def test_the_card_validates_through_the_hub_endpoint_and_a_bad_one_is_rejected(
        hub: FakeHub, in_process_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import duckdb
    from helpers import build_labeled_db
    from huggingface_hub import DatasetCard

    from swirl_core.hub import contamination, dataset_card, export_folder

    db = tmp_path / "card.duckdb"
    build_labeled_db(db)
    with duckdb.connect(str(db), read_only=True) as con:
        card = dataset_card(con, export_folder(con, tmp_path / "out"), "user/card", contamination(con))
    card.validate(repo_type="dataset")  # the fake Hub's /api/validate-yaml: licence, size bucket, configs
    assert "POST /api/validate-yaml" in hub.requests_seen
    for field, bad in (("license", "free-for-all"), ("size_categories", ["2M<n<3M"])):
        broken = DatasetCard(str(card))
        setattr(broken.data, field, bad)
        with pytest.raises(ValueError, match=field):
            broken.validate(repo_type="dataset")
    broken = DatasetCard(str(card))
    broken.data.license = "other"  # the Hub wants an `other` licence named and linked
    with pytest.raises(ValueError, match="license_name"):
        broken.validate(repo_type="dataset")


def test_upload_folder_reports_a_new_commit_only_when_the_data_changed(hub: FakeHub, in_process_client,
                                                                     tmp_path: Path) -> None:
    from swirl_core.hub import upload_folder

    folder = _write_folder(tmp_path / "folder")
    start = len(hub.requests_seen)  # the hub is shared by the module's tests
    first = upload_folder(folder, "user/changed", token=hub.token, private=False)
    again = upload_folder(folder, "user/changed", token=hub.token, private=False)
    assert first["new_commit"] and not again["new_commit"]
    assert first["commit"] == again["commit"] == hub.repo_info("user/changed")["sha"]
    seen = hub.requests_seen[start:]
    assert not any("/commits/" in r for r in seen)  # no history paging
    # Xet is off (FakeHub.env): the parquet files took the LFS path, the batch endpoint (the fake stores each
    # object once, so earlier tests' identical files are not PUT again), and no Xet token was asked for.
    assert "POST /datasets/user/changed.git/info/lfs/objects/batch" in seen
    assert not any("xet" in r for r in seen)
    (folder / "README.md").write_text(README + "\nEdited.\n")
    assert upload_folder(folder, "user/changed", token=hub.token, private=False)["new_commit"]


def test_xet_is_the_clients_default_and_is_turned_off_for_the_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_xet is installed, so without the switch the client would upload through Xet, which the fake cannot
    serve; FakeHub.env turns it off and the upload tests assert the LFS path instead."""
    from huggingface_hub import constants
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    assert is_xet_available()
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    assert not is_xet_available()
    assert FakeHub().env()["HF_HUB_DISABLE_XET"] == "1"
