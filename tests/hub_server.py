"""A local stand-in for the Hugging Face Hub, for tests that drive the real `huggingface_hub` client.

The Hub can't be reached from CI and no installable server implements its write API, so this module
serves the part of it that `huggingface_hub` (2.4) uses to create repos and branches, upload files
(LFS protocol, with Xet turned off) and read them back. It runs an HTTP server on 127.0.0.1 (a free
port) in a background thread; state lives in memory, LFS objects in files under ``root``.

Using it::

    from tests.hub_server import HubStandIn, hub  # `hub` is a pytest fixture

    def test_upload(hub):                          # fixture: started, client environment patched
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("tester/Model-GPTQ")
        api.upload_file(path_or_fileobj=b"...", path_in_repo="model.safetensors", repo_id="tester/Model-GPTQ")
        hf_hub_download("tester/Model-GPTQ", "model.safetensors", endpoint=hub.endpoint, token=hub.token,
                        cache_dir=tmp_path)

    with HubStandIn(tmp_path) as hub, hub.client_env(): ...   # the same without pytest

Point the client at it with ``HfApi(endpoint=hub.endpoint, token=...)`` and ``hf_hub_download(...,
endpoint=hub.endpoint)``. `huggingface_hub` reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET
once, at import; ``hub.client_env()`` patches those constants (and the module-level ``huggingface_hub``
functions' endpoint, and HF_TOKEN) for code under test that takes no endpoint argument.

Accounts: user ``tester`` (member of org ``test-org``). ``hub.token`` may write to both;
``hub.read_token`` may only read; ``hub.add_token(value, user, write=..., read=...)`` adds others.
An unknown token gets 401 everywhere; a token without write rights on a namespace gets 403 on
writes; private repos answer 401/404 ``RepoNotFound`` to callers who may not read them.

Endpoints (``{type}`` is models|datasets|spaces, ``{prefix}`` is '' for models, else 'datasets/'...)::

    GET    /api/whoami-v2
    POST   /api/repos/create                      409 {"error", "url"} if it exists
    DELETE /api/repos/delete
    POST   /api/validate-yaml                     README front matter must be a YAML mapping
    GET    /api/{type}/{id}[/revision/{rev}]      info: sha, private, siblings (?blobs=1: size, lfs), cardData
    PUT    /api/{type}/{id}/settings              {"private"} or {"visibility"}
    GET    /api/{type}/{id}/refs                  branches, tags, converts, pullRequests
    GET    /api/{type}/{id}/commits/{rev}         history, newest first
    GET    /api/{type}/{id}/tree/{rev}[/{path}]   ?recursive, ?expand; Link-header pagination
    POST   /api/{type}/{id}/paths-info/{rev}      form: paths=..., expand=
    POST   /api/{type}/{id}/preupload/{rev}       uploadMode lfs|regular, shouldIgnore, oid of the current file
    POST   /api/{type}/{id}/commit/{rev}          NDJSON: header, file, lfsFile, deletedFile, deletedFolder
    POST   /api/{type}/{id}/branch/{branch}       {"startingPoint"}; 409 if it exists
    DELETE /api/{type}/{id}/branch/{branch}
    POST   /api/{type}/{id}/tag/{rev}             {"tag", "message"}
    DELETE /api/{type}/{id}/tag/{tag}
    POST   /{prefix}{id}.git/info/lfs/objects/batch    objects the repo has come back without "actions"
    POST   /{prefix}{id}.git/info/lfs/objects/verify
    PUT    /lfs-upload/{sha256}?size=&sig=             "signed URL" (no auth header, like S3)
    PUT    /lfs-upload/{sha256}/part/{n}?size=&sig=    multipart parts (when multipart_chunk_size is set)
    POST   /lfs-upload/{sha256}/complete?size=&sig=    multipart completion
    HEAD/GET /{prefix}{id}/resolve/{rev}/{path}        X-Repo-Commit, ETag, X-Linked-Etag/-Size; Range

Behaviour: commits are immutable snapshots (parent + operations, 40-hex ids); ``main`` starts with an
"initial commit" holding the Hub's default ``.gitattributes``; branches and tags are refs; a new
branch starts at main's head unless ``startingPoint`` names a branch, tag or commit. A file is LFS
when ``.gitattributes`` says so, when it is binary (NUL byte in its first 512 bytes) or when it is at
least ``lfs_threshold`` bytes (10 MB on the Hub; the ``hub`` fixture uses 1 KiB so tiny test files
still exercise LFS); the commit endpoint rejects a regular file that should have been LFS and an
lfsFile whose object isn't stored; a commit whose ``parentCommit`` is not the branch's head is refused
with 412 "A commit has happened since. Please refresh and try again." (as the Hub answers create_commit's
``parent_commit``). Uploaded LFS bytes are checked against their sha256 and size;
objects are stored once (by sha256) but belong to the repos they were uploaded to, like a git-LFS
server, so the same bytes sent to another repo are uploaded again. LFS downloads are served directly
(200, no CDN redirect). Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound)
and ``X-Error-Message`` like the Hub's.

Request log, state and fault injection (deterministic; each rule is bounded; the first match wins)::

    hub.log, hub.requests(method=None, path_contains=None)   [LoggedRequest(number, method, path, status, dropped)]
    hub.lfs_upload_puts()                    completed (200) LFS upload PUTs: one per object uploaded
    hub.request_count                        requests received so far (request numbers are 1-based)
    hub.repo(id), hub.files(id, revision), hub.lfs_object_ids()      the stored state
    hub.fail_next(n, status=503, path_contains=None, method=None, headers=None)   answer the next n matching
                                             requests (headers: e.g. {"Retry-After": "120"} with a 429)
    hub.fail_request_number(k, status=500)   answer request number k
    hub.drop_connection(path_contains=LFS_UPLOAD_PREFIX, after_bytes=N, times=1, method=None)
        with a request body (PUT/POST): read N bytes of it, then close the socket without answering;
        without one (GET): send the headers and N bytes of the response body, then close
    capped_client_backoff(max_sleep_s)       caps the client's retry sleeps (1, 2, 4, 8, 8 s) for quick tests

The client retries (``http_backoff``: 408/429/5xx and network errors, 1 + 5 attempts) preupload, the
LFS batch, the LFS PUT and verify, and tree listing; hf_hub_download's GET resumes after a dropped
connection (with a Range request). It does not retry create_repo, create_branch, the commit POST,
repo info, refs, whoami or hf_hub_download's HEAD.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

HUB_LFS_THRESHOLD = 10 * 1024 * 1024
LFS_UPLOAD_PREFIX = "/lfs-upload/"
LFS_BATCH_SUFFIX = ".git/info/lfs/objects/batch"
SAMPLE_SIZE = 512
DEFAULT_USER = "tester"
DEFAULT_ORG = "test-org"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# The .gitattributes the Hub puts in a new repo's initial commit.
HUB_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


# --------------------------------------------------------------------------------------------------
# Hashes and pointers


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --------------------------------------------------------------------------------------------------
# Data model: files, commits, repos, tokens, the request log and fault rules


@dataclass(frozen=True)
class StoredFile:
    """One file in a commit: inline content (regular) or a reference to an LFS object."""

    size: int
    blob_oid: str
    content: bytes | None = None
    lfs_sha256: str | None = None

    @classmethod
    def regular(cls, content: bytes) -> StoredFile:
        return cls(size=len(content), blob_oid=git_blob_oid(content), content=content)

    @classmethod
    def lfs(cls, sha256: str, size: int) -> StoredFile:
        return cls(size=size, blob_oid=git_blob_oid(lfs_pointer(sha256, size)), lfs_sha256=sha256)

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.lfs_sha256 or "", self.size))

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: the sha256 for LFS files, the git oid otherwise."""
        return self.lfs_sha256 or self.blob_oid

    @property
    def preupload_oid(self) -> str:
        """What preupload reports (and the client compares with its local file to skip unchanged ones)."""
        return self.etag


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    files: Mapping[str, StoredFile]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a tag or a full commit id -> that commit (None if it names nothing)."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and revision.startswith("refs/heads/"):
            oid = self.branches.get(revision.removeprefix("refs/heads/"))
        if oid is None and revision in self.commits:
            oid = revision
        return self.commits.get(oid) if oid else None

    def history(self, commit: Commit) -> list[Commit]:
        """`commit` and its ancestors, newest first."""
        chain = [commit]
        while chain[-1].parent is not None:
            chain.append(self.commits[chain[-1].parent])
        return chain

    def url(self, endpoint: str) -> str:
        return f"{endpoint}/{URL_PREFIXES[self.repo_type]}{self.repo_id}"

    @property
    def key(self) -> str:
        return f"{self.repo_type}s/{self.repo_id}"


@dataclass(frozen=True)
class Token:
    value: str
    user: str
    write: frozenset[str]
    read: frozenset[str]

    def can_write(self, namespace: str) -> bool:
        return namespace in self.write

    def can_read(self, namespace: str) -> bool:
        return namespace in self.write or namespace in self.read


@dataclass
class LoggedRequest:
    number: int
    method: str
    path: str
    status: int | None = None  # None while in flight, and for dropped connections
    dropped: bool = False
    body_bytes: int = 0


@dataclass
class FaultRule:
    """Answer (or drop) up to `remaining` requests matching method / path / request number."""

    remaining: int
    status: int | None = None  # None: drop the connection
    path_contains: str | None = None
    method: str | None = None
    request_number: int | None = None
    after_bytes: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # sent with the injected answer (e.g. Retry-After)

    def matches(self, number: int, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.request_number is None or self.request_number == number)
            and (self.method is None or self.method.upper() == method)
            and (self.path_contains is None or self.path_contains in path)
        )


class HubError(Exception):
    """An error answer: status, message (JSON body + X-Error-Message) and optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


def repo_not_found(status: int = 404) -> HubError:
    return HubError(status, "Repository not found", "RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def entry_not_found(path: str, commit: Commit | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit.oid} if commit else {}
    return HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)


# --------------------------------------------------------------------------------------------------
# Requests and responses as the handlers see them


@dataclass
class Request:
    method: str
    path: str  # raw (still percent-encoded), without the query
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # filled from the route's regex

    def json(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    @property
    def bearer_token(self) -> str | None:
        value = self.headers.get("authorization") or ""
        if not value.startswith("Bearer "):
            return None
        return value.removeprefix("Bearer ").strip() or None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, data, status: int = 200, content_type: str = "application/json", **headers) -> Response:
        return cls(status, json.dumps(data).encode(), {"Content-Type": content_type, **headers})


def error_response(error: HubError) -> Response:
    headers = {"X-Error-Message": error.message, **error.headers}
    if error.code:
        headers["X-Error-Code"] = error.code
    return Response.of_json({"error": error.message}, error.status, **headers)


# --------------------------------------------------------------------------------------------------
# The HTTP layer: parse, log, inject faults, dispatch


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024  # headers and body leave in one write
    timeout = 30  # seconds a keep-alive connection may stay idle
    hub: HubStandIn  # set on the subclass made per server

    def setup(self) -> None:
        super().setup()
        self.hub._track_connection(self.connection, open_=True)

    def finish(self) -> None:
        self.hub._track_connection(self.connection, open_=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence the default stderr log
        pass

    def _serve(self) -> None:
        entry, fault = self.hub._register_request(self.command, urlsplit(self.path).path)
        if fault is not None and fault.status is None:
            self._serve_dropped(entry, fault.after_bytes)
            return
        body = self._read_body()
        entry.body_bytes = len(body)
        if fault is not None:
            response = error_response(HubError(fault.status, f"Injected failure ({fault.status})",
                                               headers=dict(fault.headers)))
        else:
            response = self.hub._dispatch(self._request(body))
        entry.status = response.status
        self._send(response)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def _request(self, body: bytes) -> Request:
        url = urlsplit(self.path)
        return Request(self.command, url.path, parse_qs(url.query), self.headers, body)

    def _serve_dropped(self, entry: LoggedRequest, after_bytes: int) -> None:
        """Upload: read `after_bytes` of the body. Download: send headers + `after_bytes` of the body. Then close."""
        if self._has_body():
            entry.body_bytes = len(self._read_body(limit=after_bytes))
        else:
            response = self.hub._dispatch(self._request(b""))
            self._send(Response(response.status, b"", response.headers), content_length=len(response.body))
            with contextlib.suppress(OSError):
                self.wfile.write(response.body[:after_bytes])
                self.wfile.flush()
        entry.dropped = True
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _has_body(self) -> bool:
        return bool(int(self.headers.get("Content-Length") or 0)) or "Transfer-Encoding" in self.headers

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(limit)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(length, limit))

    def _read_chunked(self, limit: int | None) -> bytes:
        data = bytearray()
        while limit is None or len(data) < limit:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                break
            data += self.rfile.read(size)
            self.rfile.readline()
        return bytes(data if limit is None else data[:limit])

    def _send(self, response: Response, content_length: int | None = None) -> None:
        self.send_response(response.status)
        length = len(response.body) if content_length is None else content_length
        headers = {"Content-Length": str(length), **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


Route = tuple[str, re.Pattern, Callable[[Request], Response]]
_REPO = r"(?P<type>models|datasets|spaces)/(?P<repo_id>[^/]+/[^/]+)"
_GIT_REPO = r"(?:(?P<type>datasets|spaces)/)?(?P<repo_id>[^/]+/[^/]+?)"


class HubStandIn:
    """The server and its state. Start it with `with HubStandIn(root) as hub:` or `hub.start()`."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        lfs_threshold: int = HUB_LFS_THRESHOLD,
        multipart_chunk_size: int | None = None,
        tree_page_size: int = 1000,
        user: str = DEFAULT_USER,
        orgs: tuple[str, ...] = (DEFAULT_ORG,),
    ):
        self.root = Path(root)
        self.lfs_dir = self.root / "lfs-objects"
        self.lfs_threshold = lfs_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.tree_page_size = tree_page_size
        self.log: list[LoggedRequest] = []
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._tokens: dict[str, Token] = {}
        self._orgs: dict[str, set[str]] = {org: {user} for org in orgs}
        self._faults: list[FaultRule] = []
        self._parts: dict[tuple[str, int], bytes] = {}
        self._connections: set[socket.socket] = set()
        self._commit_counter = itertools.count()
        self._signing_key = secrets.token_bytes(16)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.token = self.add_token("hf_standin_write", user, write=(user, *orgs))
        self.read_token = self.add_token("hf_standin_read", user, read=(user, *orgs))
        self._routes = self._build_routes()

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> HubStandIn:
        self.lfs_dir.mkdir(parents=True, exist_ok=True)
        handler = type("HubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="hub-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for connection in list(self._connections):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _track_connection(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(connection)

    @contextlib.contextmanager
    def client_env(self, token: str | None = None) -> Iterator[HubStandIn]:
        """Point `huggingface_hub` at this server: endpoint, online, Xet off, HF_TOKEN (restored after)."""
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import close_session

        environment = {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                       "HF_TOKEN": token or self.token}
        template = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.dict(os.environ, environment))
            for name, value in (("ENDPOINT", self.endpoint), ("HUGGINGFACE_CO_URL_TEMPLATE", template),
                                ("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", True)):
                stack.enter_context(mock.patch.object(constants, name, value))
            stack.enter_context(mock.patch.object(huggingface_hub.hf_api.api, "endpoint", self.endpoint))
            stack.callback(close_session)
            yield self

    # ---- accounts ----------------------------------------------------------------------------

    def add_token(self, value: str, user: str, *, write: tuple[str, ...] = (), read: tuple[str, ...] = ()) -> str:
        """Register a token for `user` that may write to the `write` namespaces and read `read` ones."""
        with self._lock:
            self._tokens[value] = Token(value, user, frozenset(write), frozenset(read))
        return value

    # ---- fault injection and the request log -------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503, path_contains: str | None = None,
                  method: str | None = None, headers: dict[str, str] | None = None) -> None:
        """Answer the next `n` requests matching `path_contains` / `method` with `status` (and `headers`,
        e.g. ``{"Retry-After": "120"}`` with a 429, as the Hub's rate limiter sends)."""
        self._add_fault(FaultRule(n, status, path_contains, method, headers=dict(headers or {})))

    def fail_request_number(self, number: int, status: int = 500) -> None:
        """Answer request number `number` (1-based, counted since start; see `request_count`) with `status`."""
        self._add_fault(FaultRule(1, status, request_number=number))

    def drop_connection(self, path_contains: str | None = LFS_UPLOAD_PREFIX, after_bytes: int = 0,
                        times: int = 1, method: str | None = None) -> None:
        """For the next `times` matching requests, read `after_bytes` of the body then close the socket."""
        self._add_fault(FaultRule(times, None, path_contains, method, after_bytes=after_bytes))

    def _add_fault(self, rule: FaultRule) -> None:
        with self._lock:
            self._faults.append(rule)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.log)

    def requests(self, method: str | None = None, path_contains: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [entry for entry in self.log if (method is None or entry.method == method.upper())
                    and (path_contains is None or path_contains in entry.path)]

    def lfs_upload_puts(self) -> list[LoggedRequest]:
        """LFS upload PUTs that completed (200): one per object actually stored by an upload."""
        return [entry for entry in self.requests("PUT", LFS_UPLOAD_PREFIX) if entry.status == 200]

    def _register_request(self, method: str, path: str) -> tuple[LoggedRequest, FaultRule | None]:
        with self._lock:
            entry = LoggedRequest(number=len(self.log) + 1, method=method, path=unquote(path))
            self.log.append(entry)
            fault = next((rule for rule in self._faults if rule.matches(entry.number, method, entry.path)), None)
            if fault is not None:
                fault.remaining -= 1
            return entry, fault

    # ---- inspection helpers for tests --------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            return self._repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file at `revision`, with its content (LFS objects read from the store)."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return {path: self._content(stored) for path, stored in commit.files.items()}

    def lfs_object_ids(self) -> set[str]:
        return {path.name for path in self.lfs_dir.glob("*/*")} if self.lfs_dir.is_dir() else set()

    # ---- routing -----------------------------------------------------------------------------

    def _build_routes(self) -> list[Route]:
        table = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("DELETE", r"/api/repos/delete", self._delete_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/{_REPO}", self._repo_info),
            ("GET", rf"/api/{_REPO}/revision/(?P<rev>[^/]+)", self._repo_info),
            ("PUT", rf"/api/{_REPO}/settings", self._update_settings),
            ("GET", rf"/api/{_REPO}/refs", self._list_refs),
            ("GET", rf"/api/{_REPO}/commits/(?P<rev>[^/]+)", self._list_commits),
            ("GET", rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self._list_tree),
            ("POST", rf"/api/{_REPO}/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("POST", rf"/api/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", rf"/api/{_REPO}/branch/(?P<branch>[^/]+)", self._create_branch),
            ("DELETE", rf"/api/{_REPO}/branch/(?P<branch>[^/]+)", self._delete_branch),
            ("POST", rf"/api/{_REPO}/tag/(?P<rev>[^/]+)", self._create_tag),
            ("DELETE", rf"/api/{_REPO}/tag/(?P<tag>[^/]+)", self._delete_tag),
            ("POST", rf"/{_GIT_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", rf"/{_GIT_REPO}\.git/info/lfs/objects/verify", self._lfs_verify),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})/part/(?P<part>\d+)", self._lfs_put_part),
            ("POST", r"/lfs-upload/(?P<oid>[0-9a-f]{64})/complete", self._lfs_complete),
            ("GET", rf"/{_GIT_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
            ("HEAD", rf"/{_GIT_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
        ]
        return [(method, re.compile(pattern + "$"), handler) for method, pattern, handler in table]

    def _dispatch(self, request: Request) -> Response:
        path_matched = False
        for method, pattern, handler in self._routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            path_matched = True
            if method != request.method:
                continue
            request.params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            try:
                return handler(request)
            except HubError as error:
                return error_response(error)
            except Exception as error:  # a bug in the stand-in: answer 500 with what went wrong
                return error_response(HubError(500, f"Stand-in error: {type(error).__name__}: {error}"))
        return error_response(HubError(405 if path_matched else 404, f"No route for {request.method} {request.path}"))

    # ---- auth --------------------------------------------------------------------------------

    def _caller(self, request: Request) -> Token | None:
        """The token's owner, None if anonymous; an unknown token is refused everywhere (401)."""
        value = request.bearer_token
        if value is None:
            return None
        with self._lock:
            token = self._tokens.get(value)
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _require_writer(self, request: Request, namespace: str) -> Token:
        token = self._caller(request)
        if token is None:
            raise HubError(401, "You must be authenticated to access this resource")
        if not token.can_write(namespace):
            raise HubError(403, f"You don't have the rights to write to the namespace '{namespace}'")
        return token

    def _readable_repo(self, request: Request) -> Repo:
        repo_type = REPO_TYPES[request.params.get("type") or "models"]
        token = self._caller(request)
        with self._lock:
            repo = self._repos.get((repo_type, request.params["repo_id"]))
        if repo is None:
            raise repo_not_found()
        if repo.private and token is None:
            raise repo_not_found(401)
        if repo.private and not token.can_read(repo.namespace):
            raise repo_not_found()
        return repo

    def _writable_repo(self, request: Request) -> tuple[Repo, Token]:
        repo = self._readable_repo(request)
        return repo, self._require_writer(request, repo.namespace)

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        with self._lock:
            commit = repo.resolve(revision)
        if commit is None:
            raise revision_not_found(revision)
        return commit

    # ---- account and repo endpoints ----------------------------------------------------------

    def _whoami(self, request: Request) -> Response:
        token = self._caller(request)
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": org, "roleInOrg": "write" if token.can_write(org) else "read"}
                for org, members in self._orgs.items() if token.user in members]
        return Response.of_json({
            "type": "user", "id": token.user, "name": token.user, "fullname": token.user,
            "email": f"{token.user}@example.invalid", "emailVerified": True, "isPro": False, "orgs": orgs,
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": token.value[:12], "role": "write" if token.write else "read"}},
        })

    def _create_repo(self, request: Request) -> Response:
        payload = request.json()
        token = self._caller(request)
        if token is None:
            raise HubError(401, "You must be authenticated to access this resource")
        namespace, name = payload.get("organization") or token.user, payload.get("name") or ""
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"Invalid repo name or type: {name!r} ({repo_type})")
        self._require_writer(request, namespace)
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        with self._lock:
            existing = self._repos.get((repo_type, repo_id))
            if existing is not None:
                return Response.of_json({"error": f"You already created this {repo_type} repo",
                                         "url": existing.url(self.endpoint)}, 409)
            repo = Repo(repo_id, repo_type, private, now_iso())
            initial = self._new_commit(repo, None, {".gitattributes": StoredFile.regular(HUB_GITATTRIBUTES.encode())},
                                       "initial commit", "", token.user)
            repo.branches["main"] = initial.oid
            self._repos[(repo_type, repo_id)] = repo
        return Response.of_json({"url": repo.url(self.endpoint), "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: Request) -> Response:
        payload = request.json()
        token = self._caller(request)
        namespace = payload.get("organization") or (token.user if token else "")
        repo_type = (payload.get("type") or "model") + "s"
        request.params = {"type": repo_type, "repo_id": f"{namespace}/{payload.get('name')}"}
        repo, _ = self._writable_repo(request)
        with self._lock:
            del self._repos[(repo.repo_type, repo.repo_id)]
        return Response.of_json({})

    def _update_settings(self, request: Request) -> Response:
        repo, _ = self._writable_repo(request)
        payload = request.json()
        with self._lock:
            if "visibility" in payload:
                repo.private = payload["visibility"] == "private"
            if "private" in payload:
                repo.private = bool(payload["private"])
        return Response.of_json({})

    def _validate_yaml(self, request: Request) -> Response:
        error = front_matter_error(request.json().get("content") or "")
        if error:
            return Response.of_json({"errors": [{"message": error}], "warnings": []}, 400)
        return Response.of_json({"errors": [], "warnings": []})

    def _repo_info(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._commit_at(repo, request.params.get("rev", "main"))
        with_blobs = request.flag("blobs")
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.namespace, "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": [self._sibling(path, stored, with_blobs) for path, stored in sorted(commit.files.items())],
            "usedStorage": sum(stored.size for stored in commit.files.values()),
        }
        card_data = self._card_data(commit)
        if card_data is not None:
            info["cardData"] = card_data
        expand = request.query.get("expand") or request.query.get("expand[]")
        if expand:
            info = {key: value for key, value in info.items() if key in {"_id", "id", *expand}}
        return Response.of_json(info)

    @staticmethod
    def _sibling(path: str, stored: StoredFile, with_blobs: bool) -> dict:
        if not with_blobs:
            return {"rfilename": path}
        sibling = {"rfilename": path, "size": stored.size, "blobId": stored.blob_oid}
        if stored.is_lfs:
            sibling["lfs"] = {"sha256": stored.lfs_sha256, "size": stored.size, "pointerSize": stored.pointer_size}
        return sibling

    def _card_data(self, commit: Commit) -> dict | None:
        readme = commit.files.get("README.md")
        if readme is None or readme.content is None:
            return None
        return parse_front_matter(readme.content.decode(errors="replace"))

    def _list_refs(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        with self._lock:
            branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                        for name, oid in sorted(repo.branches.items())]
            tags = [{"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid}
                    for name, oid in sorted(repo.tags.items())]
        return Response.of_json({"branches": branches, "converts": [], "tags": tags, "pullRequests": []})

    def _list_commits(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._commit_at(repo, request.params["rev"])
        with self._lock:
            history = repo.history(commit)
        return Response.of_json([{"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                                  "authors": [{"user": c.author}]} for c in history])

    # ---- tree and paths-info -----------------------------------------------------------------

    def _list_tree(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._commit_at(repo, request.params["rev"])
        folder = request.params.get("path", "").strip("/")
        if folder and not any(path.startswith(folder + "/") for path in commit.files):
            raise entry_not_found(folder, commit)
        paths = tree_paths(commit.files, folder, recursive=request.flag("recursive"))
        entries = [self._tree_entry(repo, commit, path, request.flag("expand")) for path in paths]
        return self._paginated(request, entries, page_size=50 if request.flag("expand") else self.tree_page_size)

    def _paths_info(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._commit_at(repo, request.params["rev"])
        form = parse_qs(request.body.decode())
        expand = form.get("expand", ["False"])[-1].lower() == "true"
        wanted = [path.strip("/") for path in form.get("paths", [])]
        folders = {parent for path in commit.files for parent in parent_folders(path)}
        found = [path for path in wanted if path in commit.files or path in folders]
        return Response.of_json([self._tree_entry(repo, commit, path, expand) for path in found])

    def _tree_entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        stored = commit.files.get(path)
        if stored is None:
            entry = {"type": "directory", "oid": folder_oid(commit.files, path), "size": 0, "path": path}
        else:
            entry = {"type": "file", "oid": stored.blob_oid, "size": stored.size, "path": path}
            if stored.is_lfs:
                entry["lfs"] = {"oid": stored.lfs_sha256, "size": stored.size, "pointerSize": stored.pointer_size}
        if expand:
            last = self._last_commit_touching(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
            if stored is not None:
                entry["securityFileStatus"] = {"status": "safe", "avScan": {"status": "safe"},
                                               "pickleImportScan": {"status": "unscanned"}}
        return entry

    def _last_commit_touching(self, repo: Repo, commit: Commit, path: str) -> Commit:
        def state(c: Commit):
            if path in c.files:
                return c.files[path].blob_oid
            return folder_oid(c.files, path)

        with self._lock:
            history = repo.history(commit)
        for newer, older in itertools.pairwise(history):
            if state(newer) != state(older):
                return newer
        return history[-1]

    def _paginated(self, request: Request, entries: list, page_size: int) -> Response:
        start = int(request.query.get("cursor", ["0"])[-1])
        page, headers = entries[start:start + page_size], {}
        if start + page_size < len(entries):
            query = {key: values[-1] for key, values in request.query.items()} | {"cursor": start + page_size}
            next_url = f"{self.endpoint}{request.path}?" + "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
            headers["Link"] = f'<{next_url}>; rel="next"'
        return Response.of_json(page, **headers)

    # ---- branches and tags -------------------------------------------------------------------

    def _create_branch(self, request: Request) -> Response:
        repo, _ = self._writable_repo(request)
        branch = request.params["branch"]
        if not valid_branch_name(branch):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        starting_point = request.json().get("startingPoint") or "main"
        with self._lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._commit_at(repo, starting_point).oid
        return Response.of_json({})

    def _delete_branch(self, request: Request) -> Response:
        repo, _ = self._writable_repo(request)
        branch = request.params["branch"]
        with self._lock:
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            if repo.branches.pop(branch, None) is None:
                raise revision_not_found(branch)
        return Response.of_json({})

    def _create_tag(self, request: Request) -> Response:
        repo, _ = self._writable_repo(request)
        commit = self._commit_at(repo, request.params["rev"])
        tag = request.json().get("tag") or ""
        with self._lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            repo.tags[tag] = commit.oid
        return Response.of_json({})

    def _delete_tag(self, request: Request) -> Response:
        repo, _ = self._writable_repo(request)
        with self._lock:
            if repo.tags.pop(request.params["tag"], None) is None:
                raise revision_not_found(request.params["tag"])
        return Response.of_json({})

    # ---- preupload and commit ----------------------------------------------------------------

    def _preupload(self, request: Request) -> Response:
        repo, _ = self._writable_repo(request)
        commit = self._commit_at(repo, request.params["rev"])
        payload = request.json()
        ignore_patterns = gitignore_patterns(payload.get("gitIgnore"), commit)
        files = []
        for item in payload.get("files", []):
            sample = base64.b64decode(item.get("sample") or "")
            mode = "lfs" if self._should_be_lfs(commit, item["path"], item.get("size", 0), sample) else "regular"
            answer = {"path": item["path"], "uploadMode": mode,
                      "shouldIgnore": matches_any(item["path"], ignore_patterns)}
            if item["path"] in commit.files:
                answer["oid"] = commit.files[item["path"]].preupload_oid
            files.append(answer)
        return Response.of_json({"files": files, "commitOid": commit.oid})

    def _should_be_lfs(self, commit: Commit, path: str, size: int, sample: bytes) -> bool:
        if size == 0:
            return False
        return size >= self.lfs_threshold or b"\0" in sample[:SAMPLE_SIZE] or gitattributes_lfs(commit, path)

    def _commit(self, request: Request) -> Response:
        repo, token = self._writable_repo(request)
        branch = request.params["rev"].removeprefix("refs/heads/")
        if request.query.get("create_pr"):
            raise HubError(400, "The stand-in does not implement pull requests")
        header, operations = parse_commit_payload(request.body)
        with self._lock:
            if branch not in repo.branches:
                if repo.resolve(branch) is not None:
                    raise HubError(400, f"Invalid rev id: {branch} is not a branch")
                raise revision_not_found(branch)
            parent = repo.commits[repo.branches[branch]]
            expected_parent = header.get("parentCommit")
            if expected_parent and not parent.oid.startswith(expected_parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for key, value in operations:
                self._apply_operation(repo, parent, files, key, value)
            commit = self._new_commit(repo, parent.oid, files, header.get("summary") or "",
                                      header.get("description") or "", token.user)
            repo.branches[branch] = commit.oid
        return Response.of_json({"success": True, "commitOid": commit.oid, "hookOutput": "",
                                 "commitUrl": f"{repo.url(self.endpoint)}/commit/{commit.oid}",
                                 "pullRequestUrl": None})

    def _apply_operation(self, repo: Repo, parent: Commit, files: dict[str, StoredFile], key: str,
                         value: dict) -> None:
        path = (value.get("path") or "").strip("/")
        if key == "file":
            content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                value["content"].encode()
            if self._should_be_lfs(parent, path, len(content), content[:SAMPLE_SIZE]):
                raise HubError(400, f"Your push was rejected because {path} must be stored with LFS")
            files[path] = StoredFile.regular(content)
        elif key == "lfsFile":
            files[path] = self._committed_lfs_file(repo, path, value)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise entry_not_found(f"{path} (A file with this name doesn't exist)")
        elif key == "deletedFolder":
            inside = [name for name in files if name.startswith(path + "/")]
            if not inside:
                raise entry_not_found(f"{path} (A folder with this name doesn't exist)")
            for name in inside:
                del files[name]
        else:
            raise HubError(400, f"Unknown commit operation: {key}")

    def _committed_lfs_file(self, repo: Repo, path: str, value: dict) -> StoredFile:
        oid = value.get("oid") or ""
        object_path = self._object_path(oid)
        if value.get("algo", "sha256") != "sha256" or not self._has_object(repo, oid):
            raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that does not "
                                f"exist: {path} ({oid})")
        size = object_path.stat().st_size
        if value.get("size") is not None and value["size"] != size:
            raise HubError(400, f"LFS object size mismatch for {path}: {value['size']} != {size}")
        return StoredFile.lfs(oid, size)

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile], title: str,
                    message: str, author: str) -> Commit:
        identity = json.dumps([repo.repo_id, parent, sorted((p, f.blob_oid) for p, f in files.items()),
                               title, message, next(self._commit_counter)])
        commit = Commit(hashlib.sha1(identity.encode()).hexdigest(), parent, dict(files), title, message, author,
                        now_iso())
        repo.commits[commit.oid] = commit
        return commit

    # ---- LFS ---------------------------------------------------------------------------------

    def _lfs_batch(self, request: Request) -> Response:
        repo, _ = self._writable_repo(request)
        payload = request.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "The stand-in only implements the LFS upload operation")
        objects = [self._batch_object(repo, item) for item in payload.get("objects", [])]
        transfer = "multipart" if self.multipart_chunk_size else "basic"
        return Response.of_json({"transfer": transfer, "objects": objects},
                                content_type="application/vnd.git-lfs+json")

    def _batch_object(self, repo: Repo, item: dict) -> dict:
        oid, size = str(item.get("oid", "")), item.get("size")
        if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
            return {"oid": oid, "size": size if isinstance(size, int) else 0,
                    "error": {"code": 422, "message": "Invalid oid or size"}}
        if self._has_object(repo, oid):
            return {"oid": oid, "size": size}  # already stored: no actions, the client skips it
        verify = {"href": f"{repo.url(self.endpoint)}.git/info/lfs/objects/verify"}
        return {"oid": oid, "size": size, "authenticated": True,
                "actions": {"upload": self._upload_action(repo, oid, size), "verify": verify}}

    def _upload_action(self, repo: Repo, oid: str, size: int) -> dict:
        chunk = self.multipart_chunk_size
        if not chunk or size <= chunk:
            return {"href": self._signed_url(f"{LFS_UPLOAD_PREFIX}{oid}", repo, size)}
        parts = -(-size // chunk)
        header = {f"{n:05d}": self._signed_url(f"{LFS_UPLOAD_PREFIX}{oid}/part/{n}", repo, size)
                  for n in range(1, parts + 1)}
        return {"href": self._signed_url(f"{LFS_UPLOAD_PREFIX}{oid}/complete", repo, size),
                "header": {"chunk_size": str(chunk), **header}}

    def _signature(self, path: str, repo_key: str, size: int) -> str:
        return hmac.new(self._signing_key, f"{path}:{repo_key}:{size}".encode(), hashlib.sha256).hexdigest()

    def _signed_url(self, path: str, repo: Repo, size: int) -> str:
        signature = self._signature(path, repo.key, size)
        return f"{self.endpoint}{path}?repo={quote(repo.key, safe='')}&size={size}&sig={signature}"

    def _check_signature(self, request: Request) -> tuple[Repo, int]:
        """Like a presigned S3 URL: no Authorization header, the query string is the credential."""
        repo_key, size, signature = (request.query.get(name, [""])[-1] for name in ("repo", "size", "sig"))
        if not size.isdigit() or not hmac.compare_digest(signature, self._signature(request.path, repo_key, int(size))):
            raise HubError(403, "SignatureDoesNotMatch")
        repo_type, _, repo_id = repo_key.partition("s/")
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(403, "The repository of this upload URL is gone")
        return repo, int(size)

    def _lfs_put(self, request: Request) -> Response:
        repo, size = self._check_signature(request)
        self._store_object(repo, request.params["oid"], size, request.body)
        return Response(200, b"", {"ETag": f'"{hashlib.md5(request.body).hexdigest()}"'})

    def _lfs_put_part(self, request: Request) -> Response:
        self._check_signature(request)
        with self._lock:
            self._parts[(request.params["oid"], int(request.params["part"]))] = request.body
        return Response(200, b"", {"ETag": f'"{hashlib.md5(request.body).hexdigest()}"'})

    def _lfs_complete(self, request: Request) -> Response:
        repo, size = self._check_signature(request)
        oid = request.params["oid"]
        numbers = [part["partNumber"] for part in request.json().get("parts", [])]
        with self._lock:
            missing = [n for n in numbers if (oid, n) not in self._parts]
            if missing or not numbers:
                raise HubError(400, f"Missing parts {missing} for {oid}")
            data = b"".join(self._parts.pop((oid, n)) for n in numbers)
        self._store_object(repo, oid, size, data)
        return Response.of_json({"oid": oid, "size": size})

    def _lfs_verify(self, request: Request) -> Response:
        repo, _ = self._writable_repo(request)
        payload = request.json()
        oid = str(payload.get("oid", ""))
        if not self._has_object(repo, oid) or self._object_path(oid).stat().st_size != payload.get("size"):
            raise HubError(404, f"LFS object {oid} not found")
        return Response.of_json({"success": True})

    def _has_object(self, repo: Repo, oid: str) -> bool:
        with self._lock:
            return oid in repo.lfs_oids and self._object_path(oid).is_file()

    def _store_object(self, repo: Repo, oid: str, size: int, data: bytes) -> None:
        if len(data) != size or sha256_hex(data) != oid:
            raise HubError(400, f"Uploaded bytes do not match sha256 {oid} / size {size} "
                                f"(got {len(data)} bytes, sha256 {sha256_hex(data)})")
        path = self._object_path(oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{oid}.{threading.get_ident()}.incomplete")
        partial.write_bytes(data)
        os.replace(partial, path)
        with self._lock:
            repo.lfs_oids.add(oid)

    def _object_path(self, oid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            return self.lfs_dir / "invalid"
        return self.lfs_dir / oid[:2] / oid

    def _content(self, stored: StoredFile) -> bytes:
        if stored.content is not None:
            return stored.content
        return self._object_path(stored.lfs_sha256).read_bytes()

    # ---- downloads ---------------------------------------------------------------------------

    def _resolve(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._commit_at(repo, request.params["rev"])
        path = request.params["path"]
        stored = commit.files.get(path)
        if stored is None:
            raise entry_not_found(path, commit)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'}
        if stored.is_lfs:
            headers |= {"X-Linked-Etag": f'"{stored.lfs_sha256}"', "X-Linked-Size": str(stored.size)}
        data = self._content(stored)
        byte_range = parse_range(request.headers.get("Range"), len(data))
        if byte_range is None:
            return Response(200, data, headers)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Response(206, data[start:end + 1], headers)


# --------------------------------------------------------------------------------------------------
# Pure helpers: payloads, paths, patterns


def parse_commit_payload(body: bytes) -> tuple[dict, list[tuple[str, dict]]]:
    """NDJSON commit payload -> (header value, [(operation key, value), ...])."""
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise HubError(400, f"Invalid NDJSON commit payload: {error}") from error
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "The commit payload must start with a header line")
    return lines[0].get("value") or {}, [(line.get("key"), line.get("value") or {}) for line in lines[1:]]


def parent_folders(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def tree_paths(files: Mapping[str, StoredFile], folder: str, recursive: bool) -> list[str]:
    """Entries (files and folders) under `folder`: direct children, or everything below if recursive."""
    prefix = f"{folder}/" if folder else ""
    found: set[str] = set()
    for path in files:
        if not path.startswith(prefix):
            continue
        relative = path[len(prefix):].split("/")
        if recursive:
            found.update(prefix + "/".join(relative[:i]) for i in range(1, len(relative) + 1))
        else:
            found.add(prefix + relative[0])
    folders = sorted(p for p in found if p not in files)
    return folders + sorted(p for p in found if p in files)  # the Hub lists folders first


def folder_oid(files: Mapping[str, StoredFile], folder: str) -> str | None:
    inside = sorted((p, f.blob_oid) for p, f in files.items() if p.startswith(folder + "/"))
    return hashlib.sha1(json.dumps(inside).encode()).hexdigest() if inside else None


def valid_branch_name(name: str) -> bool:
    return bool(name) and not name.startswith(("refs/", "/")) and ".." not in name and \
        re.fullmatch(r"[A-Za-z0-9._/-]+", name) is not None


def matches_any(path: str, patterns: list[str]) -> bool:
    """gitattributes/gitignore-style match: patterns without '/' match the file name at any depth."""
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        anchored = pattern.strip("/")
        if fnmatch.fnmatchcase(path, anchored) or ("/" not in anchored and fnmatch.fnmatchcase(name, anchored)):
            return True
        if fnmatch.fnmatchcase(path, anchored.replace("**/", "")):
            return True
    return False


def gitattributes_lfs(commit: Commit, path: str) -> bool:
    stored = commit.files.get(".gitattributes")
    if stored is None or stored.content is None:
        return False
    patterns = [line.split()[0] for line in stored.content.decode(errors="replace").splitlines()
                if "filter=lfs" in line.split()[1:]]
    return matches_any(path, patterns)


def gitignore_patterns(given: str | None, commit: Commit) -> list[str]:
    if given is None:
        stored = commit.files.get(".gitignore")
        given = stored.content.decode(errors="replace") if stored and stored.content else ""
    return [line.strip() for line in given.splitlines() if line.strip() and not line.startswith(("#", "!"))]


def split_front_matter(text: str) -> str | None:
    """The YAML between a README's leading '---' lines, or None when there is none."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    return match.group(1) if match else None


def front_matter_error(text: str) -> str | None:
    block = split_front_matter(text)
    if block is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError as error:
        return f"Invalid YAML in the metadata: {error}"
    if data is not None and not isinstance(data, dict):
        return "The metadata must be a YAML mapping"
    return None


def parse_front_matter(text: str) -> dict | None:
    block = split_front_matter(text)
    if block is None or front_matter_error(text):
        return None
    import yaml

    return yaml.safe_load(block) or {}


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """'bytes=a-b' / 'bytes=a-' / 'bytes=-n' -> (first, last) inclusive; None for no range; 416 if unsatisfiable."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or not any(match.groups()):
        return None
    first, last = match.groups()
    if not first:
        start, end = max(total - int(last), 0), total - 1
    else:
        start, end = int(first), min(int(last), total - 1) if last else total - 1
    if start >= total or start > end:
        raise HubError(416, f"Range not satisfiable: {header}", headers={"Content-Range": f"bytes */{total}"})
    return start, end


# --------------------------------------------------------------------------------------------------
# Test conveniences


@contextlib.contextmanager
def capped_client_backoff(max_sleep_s: float = 0.02) -> Iterator[None]:
    """Cap huggingface_hub's retry sleeps (http_backoff: 1, 2, 4, 8, 8 s; download resume: 1 s) for quick tests."""
    import time as real_time

    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    class _CappedTime:
        def __getattr__(self, name):
            return getattr(real_time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            real_time.sleep(min(seconds, max_sleep_s))

    with mock.patch.object(_http, "time", _CappedTime()), mock.patch.object(file_download, "time", _CappedTime()):
        yield


@pytest.fixture
def hub(tmp_path) -> Iterator[HubStandIn]:
    """A started stand-in with the client pointed at it (see `HubStandIn.client_env`); LFS from 1 KiB."""
    with HubStandIn(tmp_path / "hub", lfs_threshold=1024) as stand_in, stand_in.client_env():
        yield stand_in


__all__ = ["HubStandIn", "HubError", "LoggedRequest", "LFS_UPLOAD_PREFIX", "capped_client_backoff", "hub",
           "git_blob_oid", "lfs_pointer"]

