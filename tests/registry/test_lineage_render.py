"""`lineage --format dot|mermaid` with hostile free text in the labels (issue 12, point 6).

The base model is free text from `--base-model` (or from a row an attacker wrote): quotes,
braces, `]`, `-->`, `;`, newlines and backslashes must stay inside their label. The dot
output is parsed by a real DOT parser (pydot); the mermaid output is checked line by line
against the only statement shapes the renderer may produce, and each label decoded back.
"""

from __future__ import annotations

import html
import re

import pytest
from sqlalchemy import create_engine, text

from registry.lineage import render

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*")  # pydot's use of pyparsing

HOSTILE = [
    'm"] ; evil [label="pwned"',
    "m} digraph x { a -> b",
    "m]\n  n9[evil]",
    "m --> n0\nclick n0 callback",
    'a\\"b\\\\',
    "m|x|%%comment;#35;`md`<b>",
]


def _graph(base: str) -> dict:
    return {"root": "t/a:2",
            "nodes": [{"id": "t/a:2", "type": "version", "kind": "lora", "role": "root"},
                      {"id": "t/a:1", "type": "version", "kind": "lora", "role": "ancestor"},
                      {"id": f"base:{base}", "type": "base", "model": base, "revision": None},
                      {"id": "artifact:1", "type": "artifact", "kind": "onnx", "path": f"/out/{base}",
                       "role": "descendant"}],
            "edges": [{"from": f"base:{base}", "to": "t/a:1", "kind": "base"},
                      {"from": "t/a:1", "to": "t/a:2", "kind": "parent"},
                      {"from": "t/a:2", "to": "artifact:1", "kind": "input", "weight": 0.5}]}


@pytest.mark.parametrize("base", HOSTILE)
def test_dot_labels_cannot_escape(base):
    import pydot

    out = render(_graph(base), "dot")
    graphs = pydot.graph_from_dot_data(out)
    assert graphs is not None and len(graphs) == 1, out
    g = graphs[0]
    nodes = [n for n in g.get_nodes() if n.get_name() not in ("node", "edge", "graph", "\\n")]
    assert len(nodes) == 4 and len(g.get_edges()) == 3, out
    labels = sorted(n.get("label") for n in nodes)
    assert all(lb.startswith('"') and lb.endswith('"') for lb in labels), labels
    decoded = {_dot_unquote(lb) for lb in labels}
    assert f"base:{base}" in decoded and f"artifact:1 (onnx at /out/{base})" in decoded
    assert {(e.get_source(), e.get_destination()) for e in g.get_edges()} == {("n2", "n1"), ("n1", "n0"),
                                                                             ("n0", "n3")}


def _dot_unquote(label: str) -> str:
    body = label[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), body)


NODE = re.compile(r'  (n\d+)(\["([^"\[\]]*)"\]|\[\("([^"\[\]]*)"\)\])')
EDGE = re.compile(r"  (n\d+) -->\|([A-Za-z0-9 .,]*)\| (n\d+)")


@pytest.mark.parametrize("base", HOSTILE)
def test_mermaid_labels_cannot_escape(base):
    out = render(_graph(base), "mermaid")
    lines = out.split("\n")
    assert lines[0] == "graph LR" and len(lines) == 1 + 4 + 3, out
    labels = {}
    for line in lines[1:5]:
        m = NODE.fullmatch(line)
        assert m, line
        text_ = m.group(3) if m.group(3) is not None else m.group(4)
        assert re.fullmatch(r"[A-Za-z0-9 ._:/@(),=+-]*", re.sub(r"#\d+;", "", text_)), text_
        labels[m.group(1)] = html.unescape(re.sub(r"#(\d+);", r"&#\1;", text_))
    for line in lines[5:]:
        assert EDGE.fullmatch(line), line
    assert labels["n2"] == f"base:{base}" and labels["n3"] == f"artifact:1 (onnx at /out/{base})"


@pytest.mark.parametrize("base", HOSTILE)
def test_text_lineage_stays_one_line_per_node(base):
    out = render(_graph(base), "text")
    assert out.count("\n") == len(["root", "ancestors:", "parent", "base", "descendants:", "merged"]) - 1, out


def test_lineage_cli_with_a_hostile_base_model_row(run_cli, make_adapter, reg):
    """End to end: a base model pushed with quotes and braces, then a row rewritten with a newline."""
    import pydot

    base = 'org/m"] x [label="y" {z}'
    assert run_cli("push", make_adapter("a"), "--name", "t/a", "--base-model", base).code == 0
    eng = create_engine(reg.url)
    with eng.begin() as c:
        c.execute(text("UPDATE versions SET base_model = :b"), {"b": base + "\n} digraph evil {"})
    eng.dispose()
    for fmt in ("dot", "mermaid", "text"):
        r = run_cli("lineage", "t/a:1", "--format", fmt)
        assert r.code == 0, r.err
        if fmt == "dot":
            g = pydot.graph_from_dot_data(r.out)[0]
            assert len(g.get_edges()) == 1
        if fmt == "text":
            assert "digraph evil" in r.out and len(r.out.strip().splitlines()) == 5
