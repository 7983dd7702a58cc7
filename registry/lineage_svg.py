"""A lineage graph (from `Registry.lineage`) drawn as a standalone SVG, laid out here (no browser script).

Layout: a layered drawing left to right. Each node's column is its longest distance from a
source (base models first, then versions by parent depth, merged artifacts to the right of
their inputs); nodes keep their graph order inside a column. Edges are cubic curves with an
arrow head and their weight as a label. Every text comes from the database and is XML-escaped;
links (`href_for`) are built by the caller. The result is stable for a given graph, so it can
be compared in tests and cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape, quoteattr

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD = 230, 46, 90, 26, 20
STYLE = {  # node type -> (fill, stroke)
    "base": ("#eef2ff", "#4f46e5"),
    "version": ("#ecfdf5", "#059669"),
    "artifact": ("#fff7ed", "#ea580c"),
}


def _columns(graph: dict[str, Any]) -> dict[str, int]:
    """Longest-path layering (the lineage graph is a DAG; a cycle would be cut at its first visit)."""
    preds: dict[str, list[str]] = {n["id"]: [] for n in graph["nodes"]}
    for e in graph["edges"]:
        if e["to"] in preds and e["from"] in preds:
            preds[e["to"]].append(e["from"])
    col: dict[str, int] = {}
    visiting: set[str] = set()

    def depth(nid: str) -> int:
        if nid in col:
            return col[nid]
        if nid in visiting:
            return 0
        visiting.add(nid)
        col[nid] = max((depth(p) + 1 for p in preds[nid]), default=0)
        visiting.discard(nid)
        return col[nid]

    for n in graph["nodes"]:
        depth(n["id"])
    return col


def _clip(text: str, n: int = 30) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _lines(node: dict[str, Any]) -> tuple[str, str]:
    if node["type"] == "version":
        return node["id"], node.get("kind") or ""
    if node["type"] == "artifact":
        return node["id"], f"{node.get('kind')} \u00b7 {node.get('path') or ''}"
    return node.get("model") or node["id"], f"base model{' @ ' + node['revision'] if node.get('revision') else ''}"


def render_svg(graph: dict[str, Any], href_for: Callable[[dict[str, Any]], str | None] | None = None) -> str:
    """The SVG document of `graph`; `href_for(node)` gives each node's link (or None)."""
    cols = _columns(graph)
    rows: dict[int, int] = {}
    pos: dict[str, tuple[int, int]] = {}
    for n in graph["nodes"]:
        c = cols[n["id"]]
        r = rows.get(c, 0)
        rows[c] = r + 1
        pos[n["id"]] = (PAD + c * (NODE_W + COL_GAP), PAD + r * (NODE_H + ROW_GAP))
    width = PAD * 2 + (max(cols.values(), default=0) + 1) * (NODE_W + COL_GAP) - COL_GAP
    height = PAD * 2 + max(rows.values(), default=1) * (NODE_H + ROW_GAP) - ROW_GAP
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#64748b"/></marker></defs>']
    for e in graph["edges"]:
        if e["from"] not in pos or e["to"] not in pos:
            continue
        (x1, y1), (x2, y2) = pos[e["from"]], pos[e["to"]]
        x1, y1, x2, y2 = x1 + NODE_W, y1 + NODE_H / 2, x2, y2 + NODE_H / 2
        mid = (x1 + x2) / 2
        out.append(f'<path class="edge edge-{escape(e["kind"])}" d="M {x1} {y1} C {mid} {y1}, {mid} {y2}, '
                   f'{x2} {y2}" fill="none" stroke="#64748b" stroke-width="1.4" marker-end="url(#arrow)"/>')
        label = e["kind"] + (f" \u00d7{e['weight']:g}" if e.get("weight") is not None else "")
        out.append(f'<text class="edge-label" x="{mid}" y="{(y1 + y2) / 2 - 4}" text-anchor="middle" '
                   f'font-size="11" fill="#475569">{escape(label)}</text>')
    for n in graph["nodes"]:
        x, y = pos[n["id"]]
        fill, stroke = STYLE.get(n["type"], ("#f8fafc", "#334155"))
        bold = ' stroke-width="3"' if n["id"] == graph.get("root") else ' stroke-width="1.5"'
        title, sub = _lines(n)
        node = [f'<g class="node node-{escape(n["type"])}" data-id={quoteattr(n["id"])}>',
                f'<title>{escape(n["id"])}</title>',
                f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="{14 if n["type"] == "base" else 6}" '
                f'fill="{fill}" stroke="{stroke}"{bold}/>',
                f'<text x="{x + 10}" y="{y + 19}" font-size="13" font-weight="600" fill="#0f172a">'
                f'{escape(_clip(title))}</text>',
                f'<text x="{x + 10}" y="{y + 36}" font-size="11" fill="#475569">{escape(_clip(sub, 36))}</text>',
                "</g>"]
        href = href_for(n) if href_for else None
        if href:
            node = [f"<a href={quoteattr(href)}>", *node, "</a>"]
        out.extend(node)
    out.append("</svg>")
    return "\n".join(out)
