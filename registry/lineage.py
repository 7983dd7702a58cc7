"""Rendering a lineage graph (from `Registry.lineage`) as text, JSON, Graphviz dot or Mermaid."""

from __future__ import annotations

import json
from typing import Any


def _label(node: dict[str, Any]) -> str:
    if node["type"] == "version":
        return f"{node['id']} ({node['kind']})"
    if node["type"] == "artifact":
        return f"{node['id']} ({node['kind']} at {node['path']})"
    return node["id"]


def _edge_text(e: dict[str, Any]) -> str:
    return f"{e['kind']}, weight {e['weight']:g}" if e.get("weight") is not None else e["kind"]


def render(graph: dict[str, Any], fmt: str) -> str:
    """`fmt` is text, json, dot or mermaid."""
    if fmt == "json":
        return json.dumps(graph, indent=2)
    nodes = {n["id"]: n for n in graph["nodes"]}
    if fmt == "dot":
        lines = ["digraph lineage {", "  rankdir=LR;"]
        shapes = {"version": "box", "base": "cylinder", "artifact": "note"}
        for n in graph["nodes"]:
            style = ', style="bold"' if n["id"] == graph["root"] else ""
            lines.append(f'  "{n["id"]}" [label="{_label(n)}", shape={shapes[n["type"]]}{style}];')
        for e in graph["edges"]:
            lines.append(f'  "{e["from"]}" -> "{e["to"]}" [label="{_edge_text(e)}"];')
        lines.append("}")
        return "\n".join(lines)
    if fmt == "mermaid":
        ids = {nid: f"n{i}" for i, nid in enumerate(nodes)}
        lines = ["graph LR"]
        for nid, n in nodes.items():
            text = _label(n).replace('"', "'")
            lines.append(f'  {ids[nid]}["{text}"]' if n["type"] != "base" else f'  {ids[nid]}[("{text}")]')
        for e in graph["edges"]:
            lines.append(f'  {ids[e["from"]]} -->|{_edge_text(e)}| {ids[e["to"]]}')
        return "\n".join(lines)
    # text: root, then ancestors nearest first, then descendants breadth first
    root = graph["root"]
    parents = {e["to"]: e for e in graph["edges"] if e["kind"] == "parent"}
    bases = {e["to"]: e["from"] for e in graph["edges"] if e["kind"] == "base"}
    out = [_label(nodes[root])]
    out.append("ancestors:")
    cur, depth, any_anc = root, 1, False
    while True:
        if cur in bases:
            out.append("  " * depth + f"base {bases[cur][5:]}")
            any_anc = True
        if cur not in parents:
            break
        cur = parents[cur]["from"]
        out.append("  " * depth + f"parent {_label(nodes[cur])}")
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
            out.append("  " * depth + f"{what} {_label(nodes[e['to']])}{extra}")
            walk(e["to"], depth + 1)

    before = len(out)
    walk(root, 1)
    if len(out) == before:
        out.append("  (none)")
    return "\n".join(out)
