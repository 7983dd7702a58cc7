"""Lineage: the graph around a version (ancestors: parents and base model; descendants:
child versions and the artifacts built from them), and that graph rendered as text, JSON,
Graphviz dot, Mermaid or SVG (`registry.lineage_svg`).

A graph is {"root": id, "nodes": [{id, type, ...}], "edges": [{from, to, kind, weight?}]};
node ids are `name:N`, `artifact:ID` and `base:<model>[@<revision>]`.

Every label can hold free text from the database (`--base-model`, artifact paths), so each
format escapes it for its own syntax (`_dot_text`, `_mermaid_text`, `_plain`): whatever a
field holds, it stays inside its label and cannot add nodes, edges or directives. Node ids
in dot and mermaid are generated (`n0`, `n1`...), never taken from the data.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import refs
from registry.db import Database
from registry.models import Artifact, ArtifactInput, Version
from registry.names import artifact_ref


def build(db: Database, ref: str, max_depth: int = 1000) -> dict[str, Any]:
    """The lineage graph of `ref`, walking at most `max_depth` steps each way."""
    with db.read() as s:
        return _Builder(s).graph(refs.version_row(s, ref), max_depth)


class _Builder:
    def __init__(self, s: Session):
        self.s = s
        self.nodes: dict[str, dict[str, Any]] = {}
        self.edges: list[dict[str, Any]] = []

    def version(self, v: Version) -> str:
        key = refs.label(v)
        if key not in self.nodes:
            self.nodes[key] = {"id": key, "type": "version", "kind": v.kind, "digest": v.digest,
                               "base_model": v.base_model, "base_revision": v.base_revision}
        return key

    def base(self, v: Version) -> str | None:
        if not v.base_model:
            return None
        key = f"base:{v.base_model}" + (f"@{v.base_revision}" if v.base_revision else "")
        self.nodes.setdefault(key, {"id": key, "type": "base", "model": v.base_model,
                                    "revision": v.base_revision})
        return key

    def edge(self, src: str, dst: str, kind: str, weight: float | None = None) -> None:
        self.edges.append({"from": src, "to": dst, "kind": kind} | ({"weight": weight} if kind == "input" else {}))

    def graph(self, root: Version, max_depth: int) -> dict[str, Any]:
        root_key = self.version(root)
        self.nodes[root_key]["role"] = "root"
        self.ancestors(root, max_depth)
        self.descendants(root, max_depth)
        return {"root": root_key, "nodes": list(self.nodes.values()), "edges": self.edges}

    def ancestors(self, cur: Version, max_depth: int) -> None:
        depth = 0
        while cur is not None and depth < max_depth:
            b = self.base(cur)
            if b:
                self.edge(b, self.version(cur), "base")
            par = cur.parent
            if par is None:
                break
            self.edge(self.version(par), self.version(cur), "parent")
            self.nodes[self.version(par)].setdefault("role", "ancestor")
            cur, depth = par, depth + 1

    def descendants(self, root: Version, max_depth: int) -> None:
        s = self.s
        frontier, seen, depth = [root], {root.id}, 0
        while frontier and depth < max_depth:
            by_id = {v.id: v for v in frontier}
            for vid, aid, w in s.execute(select(ArtifactInput.version_id, ArtifactInput.artifact_id,
                                                ArtifactInput.weight).where(ArtifactInput.version_id.in_(list(by_id)))):
                a = s.get(Artifact, aid)
                key = artifact_ref(aid)
                self.nodes.setdefault(key, {"id": key, "type": "artifact", "kind": a.kind, "path": a.path,
                                            "digest": a.digest, "role": "descendant"})
                self.edge(self.version(by_id[vid]), key, "input", w)
            nxt = []
            for c in s.scalars(select(Version).where(Version.parent_id.in_(list(by_id))).order_by(Version.id)).all():
                if c.id in seen:
                    continue
                seen.add(c.id)
                self.edge(self.version(by_id[c.parent_id]), self.version(c), "parent")
                self.nodes[self.version(c)].setdefault("role", "descendant")
                nxt.append(c)
            frontier, depth = nxt, depth + 1

_MERMAID_SAFE = re.compile(r"[A-Za-z0-9 ._:/@(),=+-]")


def _label(node: dict[str, Any]) -> str:
    if node["type"] == "version":
        return f"{node['id']} ({node['kind']})"
    if node["type"] == "artifact":
        return f"{node['id']} ({node['kind']} at {node['path']})"
    return node["id"]


def _edge_text(e: dict[str, Any]) -> str:
    return f"{e['kind']}, weight {e['weight']:g}" if e.get("weight") is not None else e["kind"]


def _dot_text(text: str) -> str:
    """The inside of a double-quoted dot string: backslash, quote and line breaks escaped."""
    out = text.replace("\\", "\\\\").replace('"', '\\"')
    out = out.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)


def _mermaid_text(text: str) -> str:
    """The inside of a quoted mermaid label: everything but plain characters as `#NNN;` entities."""
    return "".join(c if _MERMAID_SAFE.fullmatch(c) else f"#{ord(c)};" for c in text)


def _plain(text: str) -> str:
    """One terminal line: control characters (newlines included) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(graph: dict[str, Any], fmt: str) -> str:
    """`fmt` is text, json, dot or mermaid."""
    if fmt == "svg":
        from registry.lineage_svg import render_svg

        return render_svg(graph)
    if fmt == "json":
        return json.dumps(graph, indent=2)
    nodes = {n["id"]: n for n in graph["nodes"]}
    ids = {nid: f"n{i}" for i, nid in enumerate(nodes)}
    if fmt == "dot":
        lines = ["digraph lineage {", "  rankdir=LR;"]
        shapes = {"version": "box", "base": "cylinder", "artifact": "note"}
        for nid, n in nodes.items():
            style = ', style="bold"' if nid == graph["root"] else ""
            lines.append(f'  {ids[nid]} [label="{_dot_text(_label(n))}", shape={shapes[n["type"]]}{style}];')
        for e in graph["edges"]:
            lines.append(f'  {ids[e["from"]]} -> {ids[e["to"]]} [label="{_dot_text(_edge_text(e))}"];')
        lines.append("}")
        return "\n".join(lines)
    if fmt == "mermaid":
        lines = ["graph LR"]
        for nid, n in nodes.items():
            text = _mermaid_text(_label(n))
            lines.append(f'  {ids[nid]}["{text}"]' if n["type"] != "base" else f'  {ids[nid]}[("{text}")]')
        for e in graph["edges"]:
            lines.append(f'  {ids[e["from"]]} -->|{_mermaid_text(_edge_text(e))}| {ids[e["to"]]}')
        return "\n".join(lines)
    # text: root, then ancestors nearest first, then descendants breadth first
    root = graph["root"]
    parents = {e["to"]: e for e in graph["edges"] if e["kind"] == "parent"}
    bases = {e["to"]: e["from"] for e in graph["edges"] if e["kind"] == "base"}
    out = [_plain(_label(nodes[root]))]
    out.append("ancestors:")
    cur, depth, any_anc = root, 1, False
    while True:
        if cur in bases:
            out.append("  " * depth + f"base {_plain(bases[cur][5:])}")
            any_anc = True
        if cur not in parents:
            break
        cur = parents[cur]["from"]
        out.append("  " * depth + f"parent {_plain(_label(nodes[cur]))}")
        any_anc = True
        depth += 1
    if not any_anc:
        out.append("  (none)")
    out.append("descendants:")
    children: dict[str, list[dict[str, Any]]] = {}
    for e in graph["edges"]:
        if e["kind"] in ("parent", "input"):
            children.setdefault(e["from"], []).append(e)
    seen = {root}

    def walk(nid: str, depth: int) -> None:
        for e in children.get(nid, []):
            if e["to"] in seen or nodes[e["to"]].get("role") == "ancestor":
                continue
            seen.add(e["to"])
            what = "merged into" if e["kind"] == "input" else "child"
            extra = f" (weight {e['weight']:g})" if e.get("weight") is not None else ""
            out.append("  " * depth + f"{what} {_plain(_label(nodes[e['to']]))}{extra}")
            walk(e["to"], depth + 1)

    before = len(out)
    walk(root, 1)
    if len(out) == before:
        out.append("  (none)")
    return "\n".join(out)
