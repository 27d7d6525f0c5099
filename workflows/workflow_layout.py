"""Where the nodes of a template go on the canvas, and checks of the drawn result: no node on
another, no link through a node, and the view a template opens with (framed on its Read me at a
zoom where the frontend draws text).

Canvas units throughout. LiteGraph draws a node's title bar above its position and a link as a
cubic Bezier from an output slot on the right edge of its node to an input slot on the left edge
of its target, with control points a quarter of the distance out horizontally (``LiteGraph
SPLINE_LINK``, the default link style of frontends 1.32 and 1.49).
"""

from __future__ import annotations

import math
import random

import numpy as np
from kontext_templates import Node

TITLE_H = 30
GAP_X = 60
GAP_Y = 40
DEFAULT_WIDTH = 340
SLOT_H = 20  # LiteGraph.NODE_SLOT_HEIGHT
# The view a template opens with: its Read me at full size, this far from the canvas's corner.
# Frontends drop text and widgets below about 0.6 (1.49 draws blank boxes at 0.37-0.51).
OPEN_SCALE = 1.0
OPEN_MARGIN = (60, 150)  # clear of the page's menus and the workflow's name (1.32)


def node_size(node: Node, n_inputs: int, n_outputs: int, n_widgets: int) -> list[int]:
    """The node's size below its title bar. The default is above what both supported frontends
    compute as the minimum (LiteGraph's computeSize: 20 px per slot row and 24 per widget,
    measured in 1.32 and 1.49; tests/test_web_ui.py checks every template node against it)."""
    if node.size:
        return list(node.size)
    return [DEFAULT_WIDTH, 30 + 22 * max(n_inputs, n_outputs) + 26 * n_widgets + node.room]


def layout(nodes: list[Node], sizes: dict[int, list[int]]) -> dict[int, list[int]]:
    """Positions: columns left to right, each as wide as its widest node, nodes stacked in the
    order listed with room for the title bar between them, or at their own ``y``."""
    columns: dict[int, list[Node]] = {}
    for node in nodes:
        columns.setdefault(node.col, []).append(node)
    pos, x = {}, 0
    for col in sorted(columns):
        y = 0
        for node in columns[col]:
            y = node.y if node.y is not None else y
            pos[node.id] = [x, y]
            y += sizes[node.id][1] + TITLE_H + GAP_Y
        x += max(sizes[n.id][0] for n in columns[col]) + GAP_X
    return pos


def node_boxes(ui: dict) -> list[tuple[str, list[float]]]:
    """Each node of a UI workflow as (label, [x, y, width, height]) on the canvas, title bar
    included (LiteGraph draws it above ``pos``)."""
    return [
        (f"{n['id']} {n.get('title') or n['type']}", [n["pos"][0], n["pos"][1] - TITLE_H, *n["size"]])
        for n in ui["nodes"]
    ]


def overlapping(boxes: list[tuple[str, list[float]]]) -> list[tuple[str, str]]:
    """The pairs of boxes that overlap (touching edges do not count)."""
    pairs = []
    for i, (a, (ax, ay, aw, ah)) in enumerate(boxes):
        for b, (bx, by, bw, bh) in boxes[i + 1 :]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                pairs.append((a, b))
    return pairs


# --------------------------------------------------------------------------------------------
# Links as the frontend draws them
# --------------------------------------------------------------------------------------------


def _slot_y(node: dict, index: int) -> float:
    """LiteGraph's slot position: the middle of slot row ``index`` below the node's position."""
    return node["pos"][1] + (index + 0.7) * SLOT_H


def link_curves(ui: dict, samples: int = 48) -> list[tuple[str, int, int, list[tuple[float, float]]]]:
    """Each link of a UI workflow as (label, source id, target id, points along its curve)."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    curves = []
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        a, b = nodes[src], nodes[dst]
        start = (a["pos"][0] + a["size"][0], _slot_y(a, src_slot))
        end = (b["pos"][0], _slot_y(b, dst_slot))
        reach = 0.25 * ((end[0] - start[0]) ** 2 + (end[1] - start[1]) ** 2) ** 0.5
        c1, c2 = (start[0] + reach, start[1]), (end[0] - reach, end[1])
        points = []
        for k in range(samples + 1):
            t = k / samples
            u = 1 - t
            points.append(
                tuple(
                    u**3 * p0 + 3 * u * u * t * p1 + 3 * u * t * t * p2 + t**3 * p3
                    for p0, p1, p2, p3 in zip(start, c1, c2, end, strict=True)
                )
            )
        label = f"link {link_id} {kind}: {src} {a.get('title') or a['type']} -> {dst} {b.get('title') or b['type']}"
        curves.append((label, src, dst, points))
    return curves


def _links_over_nodes(ui: dict, inset: float) -> tuple[list[str], list[str], np.ndarray]:
    """(link labels, node labels, links x nodes: the link's curve passes over the node, its ends
    excluded). A node's box includes its title bar and is shrunk by ``inset``."""
    curves = link_curves(ui)
    labelled = node_boxes(ui)
    boxes = np.array([box for _, box in labelled], dtype=float)  # x, y, w, h
    pts = np.array([points for *_, points in curves])  # links x samples x 2
    x, y = pts[..., 0][:, :, None], pts[..., 1][:, :, None]
    inside = (
        (x > boxes[:, 0] + inset)
        & (x < boxes[:, 0] + boxes[:, 2] - inset)
        & (y > boxes[:, 1] + inset)
        & (y < boxes[:, 1] + boxes[:, 3] - inset)
    ).any(axis=1)
    ids = [n["id"] for n in ui["nodes"]]
    ends = np.array([[i in (src, dst) for i in ids] for _, src, dst, _ in curves])
    return [c[0] for c in curves], [label for label, _ in labelled], inside & ~ends


def links_through_nodes(ui: dict, inset: float = 4.0) -> list[tuple[str, str]]:
    """(link, node) pairs where a link's curve passes over a node other than its two ends (the
    node's box with its title bar, shrunk by ``inset`` so that a curve grazing an edge does not
    count)."""
    links, nodes, over = _links_over_nodes(ui, inset)
    return [(links[i], nodes[j]) for i, j in zip(*np.nonzero(over), strict=True)]


def _layout_cost(ui: dict, inset: float = 4.0) -> float:
    """What ``untangle`` minimises: links over nodes and overlapping nodes first, then nodes out of
    their listed order in a column, how far the links climb, how tall the graph is and how far
    down its nodes sit."""
    crossings = int(_links_over_nodes(ui, inset)[2].sum())
    boxes = np.array([box for _, box in node_boxes(ui)], dtype=float)
    bx, by, bw, bh = boxes.T
    # At least GAP_Y between nodes, as when stacked: the frontend may draw a node a little taller.
    bh = bh + GAP_Y
    over = (
        (bx[:, None] < bx + bw)
        & (bx < (bx + bw)[:, None])
        & (by[:, None] < by + bh)
        & (by < (by + bh)[:, None])
    )
    overlaps = int((over.sum() - len(boxes)) // 2)
    # Each column keeps the order its nodes are listed in (loaders, then prompt, ... top down).
    column_ends: dict[float, float] = {}
    out_of_order = 0
    for x0, top, height in zip(bx, by, bh, strict=True):
        out_of_order += top < column_ends.get(x0, -1e9)
        column_ends[x0] = top + height
    climb = sum(abs(points[-1][1] - points[0][1]) for *_, points in link_curves(ui, samples=1))
    return (
        1e6 * (crossings + overlaps)
        + 5e3 * out_of_order
        + climb
        + 2.0 * float((by + bh).max())
        + 0.5 * float(by.sum())
    )


def untangle(
    ui: dict, rounds: int = 6000, seed: int = 0, keep: frozenset = frozenset(), max_y: int = 2400
) -> int:
    """Moves nodes up and down their columns (between 0 and ``max_y``) until no link passes over
    a node and no node overlaps another, then packs the graph as short as that allows: simulated
    annealing and then plain descent, with a fixed seed, so the same graph always gets the same
    layout. Nodes whose id is in ``keep`` stay put. Returns the crossings and overlaps left."""
    rng = random.Random(seed)
    movable = [n for n in ui["nodes"] if n["id"] not in keep]
    cost = _layout_cost(ui)
    best = (cost, [list(n["pos"]) for n in ui["nodes"]])
    for r in range(2 * rounds):
        # Annealing first (worse layouts accepted now and then, less and less), then descent.
        temperature = 2e6 * (1 - r / rounds) ** 3 if r < rounds else 0.0
        node = rng.choice(movable)
        old = node["pos"][1]
        step = rng.choice((-1, 1)) * rng.choice((20, 40, 80, 160, 320, 640))
        node["pos"][1] = min(max_y, max(0, old + step))
        new_cost = _layout_cost(ui)
        if new_cost <= cost or (temperature and rng.random() < math.exp((cost - new_cost) / temperature)):
            cost = new_cost
            if cost < best[0]:
                best = (cost, [list(n["pos"]) for n in ui["nodes"]])
        else:
            node["pos"][1] = old
        if r == rounds - 1:  # descend from the best layout the annealing saw
            for n, pos in zip(ui["nodes"], best[1], strict=True):
                n["pos"] = list(pos)
            cost = best[0]
    for node, pos in zip(ui["nodes"], best[1], strict=True):
        node["pos"] = pos
    return len(links_through_nodes(ui)) + len(overlapping(node_boxes(ui)))


# --------------------------------------------------------------------------------------------
# The view a template opens with
# --------------------------------------------------------------------------------------------


def view_on(ui_nodes: list[dict], framed_type: str) -> dict:
    """The workflow's ``extra``: the canvas view (``ds``) with the first node of ``framed_type``
    (the Read me) at ``OPEN_SCALE`` near the top-left corner, and which node that is.

    Frontend 1.32 opens a template with this view. 1.49 fits the whole graph instead, at a zoom
    where no text is drawn; the pack's web extension (web/kontext_restore.js) frames the node
    named in ``kontext_restore.frame`` after the load, on both, and then removes that key so a
    workflow the user saves keeps the user's own view."""
    framed = next(n for n in ui_nodes if n["type"] == framed_type)
    x, y = framed["pos"][0], framed["pos"][1] - TITLE_H
    offset = [OPEN_MARGIN[0] / OPEN_SCALE - x, OPEN_MARGIN[1] / OPEN_SCALE - y]
    return {
        "ds": {"scale": OPEN_SCALE, "offset": offset},
        "kontext_restore": {"frame": framed["id"], "scale": OPEN_SCALE},
    }
