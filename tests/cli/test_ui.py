"""`adapters ui`: every route over real HTTP, the same data as `--json`, tokens, and a real headless browser."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import threading
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from tests.builders import write_adapter
from tests.cli_runner import invoke

EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two versions (parent and child, aliases, metadata), an artifact with a validation report, a verify."""
    root = tmp_path_factory.mktemp("ui")
    env = {"ADAPTERS_HOME": str(root / "home")}
    for args in (["push", write_adapter(root / "a", seed=1), "--name", "team/mora", "--base-model", "org/base",
                  "--meta", f"note={EVIL}", "--tag", "prod"],
                 ["push", write_adapter(root / "b", seed=2, kind="mora"), "--name", "team/mora", "--parent",
                  "team/mora:1", "--meta", "dataset=alpaca"],
                 ["tag", "team/mora:2", "prod"]):
        r = invoke(args, env)
        assert r.code == 0, r.err
    from registry.api import Registry

    out = root / "merged"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"graph")
    case = {"batch": 2, "seq": 16, "padded_rows": 1, "max_abs_diff": 2e-6, "max_rel_diff": 1e-6, "worst_ratio": 0.02}
    report = {"provider": "cpu", "requested_provider": "auto", "passed": True, "atol": 1e-4, "rtol": 1e-4,
              "graph_dtype": "float32", "reference_dtype": "float32", "criterion": "|onnx - ref| <= atol + rtol*|ref|",
              "comparisons": {"unmerged_pytorch": {"name": "base + unmerged adapters (PyTorch)", "passed": True,
                                                   "max_abs_diff": 2e-6, "max_rel_diff": 1e-6, "worst_ratio": 0.02,
                                                   "cases": [case]}}}
    with Registry.open(root / "home") as reg:
        art = reg.register_artifact(kind="onnx", path=out, recipe={"kind": "onnx"},
                                    inputs=[("team/mora:2", 0.5)], report=report)
    r = invoke(["verify", "--json"], env)
    assert r.code == 0, r.err
    return {"root": root, "env": env, "artifact": art.ref, "aid": art.id}


@pytest.fixture(scope="module")
def server(store):
    from werkzeug.serving import make_server

    from adapters_cli.ui.app import create_app

    srv = make_server("127.0.0.1", 0, create_app(store["root"] / "home"), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def get(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


@pytest.mark.parametrize("path, needles", [
    ("/", ["team/mora:2", "team/mora:1", "prod", "dataset=alpaca", "note=&lt;script&gt;"]),
    ("/?name=team/mora&where=dataset%3Dalpaca", ["team/mora:2"]),
    ("/?where=kind%3Dlora", ["team/mora:1"]),
    ("/?name=team/nothing-here", ["unknown adapter"]),
    ("/v/team/mora:2", ["team/mora:2", "parent", "team/mora:1", "adapter_model.safetensors", "Alias history",
                        "ok", "mora"]),
    ("/v/team/mora@prod", ["team/mora:2"]),
    ("/v/team/mora:1", ["org/base", "note=&lt;script&gt;alert(1)&lt;/script&gt;"]),
    ("/lineage/team/mora:1", ['<svg xmlns="http://www.w3.org/2000/svg" class="lineage"', 'class="node node-base"',
                              'class="node node-artifact"', "team/mora:2", "input"]),
    ("/verify", ["ok", "blobs", "audit events checked"]),
    ("/static/style.css", ["font"]),
])
def test_pages(server, path, needles):
    status, body, headers = get(server + path)
    assert status == (404 if "nothing-here" in path else 200), body[:300]
    for n in needles:
        assert n in body, (n, body[:2000])
    assert EVIL not in body  # never unescaped
    if path != "/static/style.css":
        assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_artifact_page_shows_inputs_and_the_validation_per_case(server, store):
    status, body, _ = get(f"{server}/a/{store['aid']}")
    assert status == 200
    for n in (store["artifact"], "team/mora:2", "0.5", "passed", "base + unmerged adapters (PyTorch)", "0.02",
              "model.onnx"):
        assert n in body, n


def test_api_returns_exactly_the_cli_json(server, store):
    env = store["env"]
    for api, cli in (("/api/list", ["list", "--json"]),
                     ("/api/show/team/mora:2", ["show", "team/mora:2", "--json"]),
                     (f"/api/show/{store['artifact']}", ["show", store["artifact"], "--json"]),
                     ("/api/lineage/team/mora:1", ["lineage", "team/mora:1", "--json"]),
                     ("/api/audit", ["audit", "--json"])):
        status, body, _ = get(server + api)
        assert status == 200 and json.loads(body) == invoke(cli, env).json(), api
    status, body, _ = get(server + "/api/verify")
    rep = json.loads(body)
    assert rep["ok"] is True and rep["blobs_checked"] >= 2 and "finished" in rep


def test_unknown_things_are_404_not_500(server):
    for path in ("/v/team/nope:1", "/a/999", "/lineage/nope", "/nothing", "/api/show/nope", "/?offset=x9"):
        status, body, _ = get(server + path)
        assert status in (400, 404), (path, status)
        assert "Traceback" not in body


def test_token_is_checked_on_every_request(store):
    from adapters_cli.ui.app import create_app

    client = create_app(store["root"] / "home", token="t" * 20).test_client()
    assert client.get("/").status_code == 401
    assert client.get("/api/list").status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer " + "x" * 20}).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer " + "t" * 20}).status_code == 200
    first = client.get("/?token=" + "t" * 20)
    assert first.status_code == 200 and "HttpOnly" in first.headers["Set-Cookie"]
    assert client.get("/v/team/mora:2").status_code == 200  # the cookie now carries it


def test_binding_beyond_loopback_needs_a_token(store):
    r = invoke(["ui", "--host", "0.0.0.0"], store["env"])
    assert r.code == 2 and "needs --token" in r.err and len(r.err.strip().splitlines()) == 1


def _png_pixels(path: Path) -> set[tuple[int, int, int]]:
    """The set of RGB colours of an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, _, depth, ctype = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    raw, stride, prev, colours = zlib.decompress(idat), width * bpp, bytearray(width * bpp), set()
    for i in range(0, len(raw), stride + 1):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        colours.update(tuple(line[x:x + 3]) for x in range(0, stride, bpp))
        prev = line
    return colours


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Debian's chromium is installed by scripts/test.sh (as root)")
def test_lineage_page_renders_in_a_real_headless_browser(server, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    url = f"{server}/lineage/team/mora:1"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="node node-') == 4 and "team/mora:2" in dom and "artifact:" in dom, dom[:500]
    shot = tmp_path / "lineage.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,700", url],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 5000
    colours = _png_pixels(shot)
    # the three node kinds' fills, drawn by the browser from the server-side SVG
    assert {(0xEC, 0xFD, 0xF5), (0xEE, 0xF2, 0xFF), (0xFF, 0xF7, 0xED)} <= colours
