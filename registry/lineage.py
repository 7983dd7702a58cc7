"""Rendering a lineage graph (from `Registry.lineage`) as text, JSON, Graphviz dot, Mermaid or SVG.

Every label can hold free text from the database (`--base-model`, artifact paths), so each
format escapes it for its own syntax (`_dot_text`, `_mermaid_text`, `_plain`): whatever a
field holds, it stays inside its label and cannot add nodes, edges or directives. Node ids
in dot and mermaid are generated (`n0`, `n1`...), never taken from the data.
"""

from __future__ import annotations

import json
import re
from typing import Any

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
