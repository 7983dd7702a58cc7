"""A minimal Hugging Face Hub endpoint on 127.0.0.1 for tests (a real HTTP server in a thread).

It implements only what huggingface_hub's `create_repo`, `create_branch` and
`upload_folder`/`create_commit` call over the legacy LFS path (the tests set
`HF_HUB_DISABLE_XET=1`), checked against huggingface_hub 2.4's source:

    POST /api/repos/create                              {"name", "organization", "visibility"|"private", "type"}
    POST /api/models/{repo}/branch/{branch}
    POST /api/validate-yaml                             (README.md metadata)
    POST /api/models/{repo}/preupload/{revision}        -> uploadMode per file
    POST /{repo}.git/info/lfs/objects/batch             -> basic upload actions
    PUT  /lfs/{oid}                                     the LFS object (its sha256 is checked)
    POST /api/models/{repo}/commit/{revision}           ndjson: header, file, lfsFile
    GET  /api/models/{repo}/revision/{revision}         (snapshot_download) 404 RepoNotFound or RevisionNotFound

Like the Hub, `*.safetensors` and files over 10 MB go through LFS, others inline. Anything
else answers 404 and is recorded in `unhandled`, so a test sees a call it does not serve.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

# Calls huggingface_hub makes on the side and tolerates a 404 for (not part of an upload):
# its agent detection fetches this registry at most once a day.
OPTIONAL = {"/api/agent-harnesses"}


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.calls: list[str] = []
        self.unhandled: list[str] = []
        self.lock = threading.Lock()


def _handler(state: HubState, endpoint: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, obj=None, headers: dict | None = None) -> None:
            data = json.dumps(obj if obj is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            path = unquote(urlparse(self.path).path)
            body = self._body()
            with state.lock:
                state.calls.append(f"{method} {path}")
            parts = path.strip("/").split("/")
            if method == "POST" and path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                with state.lock:
                    if repo in state.repos:
                        return self._send(409, {"error": "You already created this model repo",
                                                "url": f"{endpoint[0]}/{repo}"})  # the Hub's 409 names it too
                    private = bool(req.get("private")) or req.get("visibility") == "private"  # 2.x sends visibility
                    state.repos[repo] = {"private": private, "branches": {"main": {}}}
                return self._send(200, {"url": f"{endpoint[0]}/{repo}", "name": repo})
            if method == "POST" and path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if parts[:2] == ["api", "models"] and len(parts) >= 5:
                repo, verb, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                if method == "GET" and verb == "revision":
                    if repo not in state.repos:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                if repo not in state.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                branches = state.repos[repo]["branches"]
                if method == "POST" and verb == "branch":
                    with state.lock:
                        if rev in branches:
                            return self._send(409, {"error": "Reference already exists"})
                        branches[rev] = dict(branches["main"])
                    return self._send(200, {})
                if method == "POST" and verb == "preupload":
                    req = json.loads(body)
                    files = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                              "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > 10_000_000
                              else "regular"} for f in req["files"]]
                    return self._send(200, {"files": files})
                if method == "POST" and verb == "commit":
                    if rev not in branches:
                        return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    tree = dict(branches[rev])
                    for item in lines:
                        v = item["value"]
                        if item["key"] == "file":
                            tree[v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] == "lfsFile":
                            if v["oid"] not in state.lfs:
                                return self._send(422, {"error": f"LFS object {v['oid']} was not uploaded"})
                            tree[v["path"]] = state.lfs[v["oid"]]
                    oid = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(b).hexdigest())
                                                         for k, b in tree.items())).encode()).hexdigest()
                    with state.lock:
                        branches[rev] = tree
                        state.commits.append({"repo": repo, "revision": rev, "oid": oid,
                                              "header": lines[0]["value"], "paths": sorted(tree)})
                    return self._send(200, {"commitUrl": f"{endpoint[0]}/{repo}/commit/{oid}", "commitOid": oid,
                                            "success": True, "pullRequestUrl": None})
            if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                req = json.loads(body)
                objects = [{"oid": o["oid"], "size": o["size"],
                            "actions": {"upload": {"href": f"{endpoint[0]}/lfs/{o['oid']}"}}}
                           for o in req["objects"]]
                return self._send(200, {"transfer": "basic", "objects": objects})
            if method == "PUT" and parts[0] == "lfs" and len(parts) == 2:
                if hashlib.sha256(body).hexdigest() != parts[1]:
                    return self._send(400, {"error": "sha256 mismatch"})
                with state.lock:
                    state.lfs[parts[1]] = body
                return self._send(200, {})
            if path not in OPTIONAL:
                with state.lock:
                    state.unhandled.append(f"{method} {path}")
            return self._send(404, {"error": f"not implemented by the test hub: {method} {path}"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

        def do_HEAD(self) -> None:
            self._route("HEAD")

    return Handler


class HubServer:
    """`with HubServer() as hub:` -> hub.endpoint, hub.state."""

    def __init__(self) -> None:
        self.state = HubState()
        self._endpoint = [""]
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state, self._endpoint))
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._endpoint[0] = self.endpoint
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
