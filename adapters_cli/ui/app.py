"""The web view: names and versions, one version, one artifact, the lineage graph, the last verify.

Every page reads through the same `Registry` methods, and shows the same dictionaries, as the
`--json` output of the commands (`list`, `show`, `lineage`, `audit`, `verify`); `/api/...`
returns those dictionaries as JSON. Nothing here writes to the store: GET only.

Access: bound to 127.0.0.1 by default. With a token (required by `adapters ui` for any other
address), every request must carry it: `Authorization: Bearer TOKEN`, or `?token=TOKEN` once
(a browser then keeps it in an HTTP-only cookie).
"""

from __future__ import annotations

import hmac
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Flask, abort, jsonify, make_response, render_template, request
from markupsafe import Markup

from adapters_cli.common import human_size
from registry.errors import RegistryError

COOKIE = "adapters_token"
PAGE = 50


def create_app(home: Path | None = None, db_url: str | None = None, token: str | None = None) -> Flask:
    """A Flask app over the store at `home`/`db_url`; `token`: required on every request when set."""
    app = Flask(__name__)
    local = threading.local()

    def registry():
        reg = getattr(local, "reg", None)
        if reg is None:
            from registry.api import Registry

            reg = local.reg = Registry.open(home, db_url)
        return reg

    @app.before_request
    def check_token():
        if token is None:
            return None
        given = (request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                 or request.args.get("token") or request.cookies.get(COOKIE) or "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return make_response("a valid token is required (Authorization: Bearer TOKEN or ?token=TOKEN)\n", 401)
        return None

    @app.after_request
    def headers(resp):
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = "default-src 'self'; style-src 'self'; img-src 'self' data:"
        resp.headers["Referrer-Policy"] = "no-referrer"
        if token is not None and request.args.get("token") == token:
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return resp

    @app.errorhandler(RegistryError)
    def registry_error(exc: RegistryError):
        if request.path.startswith("/api/"):
            return jsonify({"error": str(exc)}), 404
        return render_template("error.html", message=str(exc)), 404

    @app.errorhandler(404)
    def not_found(exc):
        if request.path.startswith("/api/"):
            return jsonify({"error": "not found"}), 404
        return render_template("error.html", message=f"{request.path}: no such page"), 404

    app.jinja_env.globals.update(vlink=version_link, alink=artifact_link, size=human_size)

    # ------------------------------------------------------------------ pages
    @app.get("/")
    def index():
        q = _query()
        rows = registry().list(q["name"], base_model=q["base_model"], where=q["where"], limit=PAGE + 1,
                               offset=q["offset"])
        return render_template("list.html", rows=[v.to_dict() for v in rows[:PAGE]], q=q,
                               more=len(rows) > PAGE, page=PAGE)

    @app.get("/v/<path:ref>")
    def version(ref: str):
        reg = registry()
        info = reg.show(ref).to_dict()
        events = reg.events(info["name"])
        alias_history = [e for e in events if e["action"] in ("tag", "untag")]
        mine = [e for e in reg.events(info["ref"])]
        return render_template("version.html", v=info, alias_history=alias_history, events=mine,
                               verify=_verify_index(reg))

    @app.get("/a/<int:aid>")
    def artifact(aid: int):
        reg = registry()
        a = reg.artifact(f"artifact:{aid}").to_dict()
        return render_template("artifact.html", a=a, events=reg.events(a["ref"]), verify=_verify_index(reg))

    @app.get("/lineage/<path:ref>")
    def lineage(ref: str):
        from registry.lineage_svg import render_svg

        graph = registry().lineage(ref)
        svg = render_svg(graph, href_for=node_link)
        return render_template("lineage.html", ref=ref, graph=graph, svg=Markup(svg))

    @app.get("/verify")
    def verify():
        return render_template("verify.html", report=registry().last_verify())

    # ------------------------------------------------------------------ the same data as JSON
    @app.get("/api/list")
    def api_list():
        q = _query()
        return jsonify([v.to_dict() for v in registry().list(q["name"], base_model=q["base_model"], where=q["where"],
                                                             limit=q["limit"], offset=q["offset"])])

    @app.get("/api/show/<path:ref>")
    def api_show(ref: str):
        return jsonify(registry().show(ref).to_dict())

    @app.get("/api/lineage/<path:ref>")
    def api_lineage(ref: str):
        return jsonify(registry().lineage(ref))

    @app.get("/api/audit")
    def api_audit():
        return jsonify(registry().events(request.args.get("ref") or None))

    @app.get("/api/verify")
    def api_verify():
        return jsonify(registry().last_verify())

    return app


def _query() -> dict[str, Any]:
    args = request.args

    def number(key: str, default: int) -> int:
        v = args.get(key, "")
        if not v:
            return default
        if not v.isascii() or not v.isdigit() or len(v) > 9:
            abort(400)
        return int(v)

    where = [w for w in args.getlist("where") if w.strip()]
    return {"name": args.get("name") or None, "base_model": args.get("base_model") or None, "where": where,
            "offset": number("offset", 0), "limit": number("limit", PAGE)}


def version_link(ref: str) -> str:
    return "/v/" + quote(ref, safe="/:@")


def artifact_link(ref: str) -> str:
    return "/a/" + ref.split(":", 1)[1]


def node_link(node: dict[str, Any]) -> str | None:
    if node["type"] == "version":
        return version_link(node["id"])
    if node["type"] == "artifact":
        return artifact_link(node["id"])
    return None


class _LastVerify:
    """The last `adapters verify` report, and which of its lines name a given digest or ref."""

    def __init__(self, report: dict[str, Any] | None):
        self.report = report
        self.ran = report.get("finished") if report else None
        self.lines = [*report.get("problems", []), *report.get("warnings", [])] if report else []

    def mention(self, needle: str) -> str | None:
        return next((line for line in self.lines if needle in line), None)


def _verify_index(reg) -> _LastVerify:
    return _LastVerify(reg.last_verify())
