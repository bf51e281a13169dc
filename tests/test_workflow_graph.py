"""The dashboard's workflow graph as pure functions: columns by longest path, a stable
order, arrows, the caps that keep a huge workflow drawable, and the SVG template's
escaping (trioqueue/dashboard/_workflow_graph.py, templates/workflow_graph.html)."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

import trioqueue as tq
from trioqueue.dashboard import _workflow_graph as wg
from trioqueue.dashboard._app import _templates

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


def task(
    job_id: int,
    name: str | None,
    deps: Sequence[int] = (),
    state: tq.JobState = tq.JobState.PENDING,
    kind: str = "step",
) -> tq.Job[Any]:
    return tq.Job(
        id=job_id,
        kind=kind,
        args={},
        queue="default",
        state=state,
        priority=1,
        attempt=0,
        max_attempts=25,
        attempted_at=None,
        attempted_by=[],
        created_at=NOW,
        finalized_at=None,
        scheduled_at=NOW,
        errors=[],
        metadata={},
        tags=[],
        workflow_id="wf",
        workflow_task=name,
        workflow_deps=tuple(deps),
    )


def diamond(**states: tq.JobState) -> list[tq.Job[Any]]:
    """fetch -> thumb, full -> publish (ids 1-4)."""
    names = {1: "fetch", 2: "thumb", 3: "full", 4: "publish"}
    deps = {1: (), 2: (1,), 3: (1,), 4: (2, 3)}
    return [task(i, n, deps[i], states.get(n, tq.JobState.PENDING)) for i, n in names.items()]


def placed(graph: wg.WorkflowGraph) -> dict[int | None, tuple[int, int]]:
    return {n.job_id: (n.x, n.y) for n in graph.nodes if n.job_id is not None}


def column_of(graph: wg.WorkflowGraph) -> dict[str, int]:
    return {t.name: t.column for t in graph.tasks}


def render(graph: wg.WorkflowGraph) -> str:
    return (
        _templates()
        .get_template("workflow_graph.html")
        .render(
            graph=graph,
            jobs_url="/jobs?workflow=wf",
            node_width=wg.NODE_WIDTH,
            node_height=wg.NODE_HEIGHT,
        )
    )


# ------------------------------------------------------------------ columns and order


def test_a_diamond_is_three_columns_with_an_arrow_per_dep() -> None:
    graph = wg.layout(
        diamond(fetch=tq.JobState.COMPLETED, thumb=tq.JobState.COMPLETED, full=tq.JobState.RUNNING)
    )
    assert column_of(graph) == {"fetch": 0, "thumb": 1, "full": 1, "publish": 2}
    assert [t.name for t in graph.tasks] == ["fetch", "thumb", "full", "publish"]
    assert {t.name: t.deps for t in graph.tasks}["publish"] == ("thumb", "full")
    assert graph.columns == 3 and graph.notes == []
    assert graph.states == {tq.JobState.COMPLETED: 2, tq.JobState.RUNNING: 1,
                            tq.JobState.PENDING: 1}  # fmt: skip

    at = placed(graph)
    assert at[2][0] == at[3][0] > at[1][0] and at[4][0] > at[2][0]
    assert at[2][1] < at[3][1]  # added first, drawn first
    assert at[1][1] == at[4][1] == (at[2][1] + at[3][1]) // 2  # short columns are centred
    pitch = wg.NODE_WIDTH + wg.COLUMN_GAP
    assert graph.width == 2 * wg.MARGIN + 3 * wg.NODE_WIDTH + 2 * wg.COLUMN_GAP
    assert at[4][0] - at[1][0] == 2 * pitch

    # One arrow per dep, from the right of the dep's box to the left of the dependent's;
    # solid once the dep completed.
    arrows = {(e.x1, e.y1, e.x2, e.y2): e.done for e in graph.edges}
    mid = wg.NODE_HEIGHT // 2
    right, left = wg.NODE_WIDTH, 0

    def arrow(a: int, b: int) -> tuple[int, int, int, int]:
        return (at[a][0] + right, at[a][1] + mid, at[b][0] + left, at[b][1] + mid)

    assert arrows == {
        arrow(1, 2): True,
        arrow(1, 3): True,
        arrow(2, 4): True,
        arrow(3, 4): False,
    }
    first = graph.edges[0]
    assert first.path.startswith(f"M{first.x1},{first.y1} C")
    assert first.path.endswith(f" {first.x2},{first.y2}")


def test_a_column_is_the_longest_path_from_a_root() -> None:
    # a -> b -> c, and d waits for a and c: d is after c, not next to b.
    jobs = [task(1, "a"), task(2, "b", [1]), task(3, "c", [2]), task(4, "d", [1, 3])]
    assert column_of(wg.layout(jobs)) == {"a": 0, "b": 1, "c": 2, "d": 3}
    # Independent roots share the first column.
    jobs = [task(1, "a"), task(2, "x"), task(3, "b", [1])]
    assert column_of(wg.layout(jobs)) == {"a": 0, "x": 0, "b": 1}


def test_an_arrow_that_skips_columns_goes_round_the_boxes() -> None:
    # a -> b -> c -> d, x -> d, and a -> d: two arrows skip columns.
    jobs = [task(1, "a"), task(2, "b", [1]), task(3, "c", [2]), task(4, "x"),
            task(5, "d", [3, 4, 1])]  # fmt: skip
    graph = wg.layout(jobs)
    assert column_of(graph) == {"a": 0, "x": 0, "b": 1, "c": 2, "d": 3}
    boxes = [(n.x, n.y, n.x + wg.NODE_WIDTH, n.y + wg.NODE_HEIGHT) for n in graph.nodes]
    top = min(b[1] for b in boxes)
    bottom = max(b[3] for b in boxes)
    short = [e for e in graph.edges if len(e.points) == 2]
    long = [e for e in graph.edges if len(e.points) == 6]
    assert len(short) == 3 and len(long) == 2  # a-b, b-c, c-d; a-d, x-d
    at = placed(graph)
    lanes = set()
    for edge in long:
        (_, y1), (out, y1b), (out2, lane), (back, lane2), (back2, y2b), (_, y2) = edge.points
        assert (y1b, out2, lane2, back2, y2b) == (y1, out, lane, back, y2)
        # Level out of the box, then up or down in a gap, along a lane clear of every box.
        assert lane < top or lane > bottom
        for x in (out, back):
            assert not any(b[0] <= x <= b[2] for b in boxes)
        assert edge.path == "M" + " L".join(f"{x},{y}" for x, y in edge.points)
        lanes.add(lane)
    # a is in the upper half: above; x is in the lower half with d centred: below.
    above = {e.y1 for e in long if e.points[2][1] < top}
    below = {e.y1 for e in long if e.points[2][1] > bottom}
    assert (above, below) == ({at[1][1] + wg.NODE_HEIGHT // 2}, {at[4][1] + wg.NODE_HEIGHT // 2})
    assert len(lanes) == 2
    assert graph.height == bottom + wg.LANE_GAP + wg.MARGIN and top == wg.MARGIN + wg.LANE_GAP


def test_the_drawing_depends_on_the_graph_only() -> None:
    jobs = [*diamond(), task(5, "audit", [1]), task(6, "mail", [4, 5])]
    first = wg.layout(jobs)
    shuffled = list(jobs)
    random.Random(7).shuffle(shuffled)
    states = [tq.JobState.COMPLETED, tq.JobState.DISCARDED, tq.JobState.RUNNING]
    finished = [attrs.evolve(j, state=states[j.id % 3]) for j in shuffled]
    again = wg.layout(finished)
    assert placed(again) == placed(first)
    assert [(e.x1, e.y1, e.x2, e.y2) for e in again.edges] == [
        (e.x1, e.y1, e.x2, e.y2) for e in first.edges
    ]
    assert [t.name for t in again.tasks] == [t.name for t in first.tasks]


def test_a_column_follows_the_order_of_the_deps_before_it() -> None:
    # Children added in the other order than their parents: drawn next to them anyway,
    # so the arrows do not cross.
    jobs = [task(1, "r1"), task(2, "r2"), task(3, "c2", [2]), task(4, "c1", [1])]
    at = placed(wg.layout(jobs))
    assert at[1][1] < at[2][1] and at[4][1] < at[3][1]
    assert [t.name for t in wg.layout(jobs).tasks] == ["r1", "r2", "c1", "c2"]


def test_a_dep_outside_the_workflow_is_named_by_its_job_id() -> None:
    # Task "b" waits for job 99: a unique job that stood in for a task, or one deleted.
    jobs = [task(1, "a"), task(2, "b", [99, 1]), task(3, None, [2])]
    graph = wg.layout(jobs)
    rows = {t.name: t for t in graph.tasks}
    assert rows["b"].deps == ("job 99", "a") and rows["b"].column == 1
    assert rows["job 3"].deps == ("b",)  # a task without a name: its job id
    assert len(graph.edges) == 2


def test_deps_in_a_cycle_are_drawn_in_one_last_column() -> None:
    # Workflow.add cannot make one; stored rows that did must still draw.
    jobs = [task(1, "root"), task(2, "a", [1, 3]), task(3, "b", [2]), task(4, "c", [3])]
    graph = wg.layout(jobs)
    assert column_of(graph) == {"root": 0, "a": 1, "b": 1, "c": 1}
    assert any("cycle" in note and "3 tasks" in note for note in graph.notes)


def test_an_empty_workflow_draws_nothing() -> None:
    graph = wg.layout([])
    assert (graph.nodes, graph.edges, graph.tasks, graph.columns) == ([], [], [], 0)
    assert ET.fromstring(render(graph)).tag == f"{SVG}svg"


# ------------------------------------------------------------------ caps


def test_a_huge_fan_out_draws_as_a_few_boxes() -> None:
    n = 10_000
    jobs = [task(i, f"part-{i}", state=tq.JobState.COMPLETED) for i in range(1, n + 1)]
    jobs[5] = task(6, "part-6", state=tq.JobState.DISCARDED)
    jobs[499] = task(500, "part-500", state=tq.JobState.CANCELLED)
    jobs.append(task(n + 1, "fan-in", range(1, n + 1)))
    graph = wg.layout(jobs)

    own = [node for node in graph.nodes if node.job_id is not None]
    [more] = [node for node in graph.nodes if node.job_id is None]
    assert len(own) == wg.MAX_COLUMN_TASKS + 1  # 25 parts and the fan-in
    assert more.tasks == graph.hidden_tasks == n - wg.MAX_COLUMN_TASKS
    assert more.label == "+9,975 more tasks" and more.state == "more"
    assert more.title == "9,975 more tasks: 9,974 completed · 1 cancelled"
    assert more.detail == "9,974 completed · 1 cancelled"
    # The parts drawn are the first added; the one discarded among them is drawn so.
    assert [node.job_id for node in own[:3]] == [1, 2, 3]
    assert {node.job_id: node.state for node in own}[6] == "discarded"
    # Every drawn box has one arrow to the fan-in; the group's stands for all its tasks,
    # so it is not solid: one of them was cancelled.
    assert len(graph.edges) == wg.MAX_COLUMN_TASKS + 1
    done = {(e.y1 - wg.NODE_HEIGHT // 2): e.done for e in graph.edges}
    assert done == {n.y: n.state == "completed" for n in graph.nodes if n.x == more.x}
    assert len(graph.tasks) == n + 1 and graph.tasks[-1].name == "fan-in"
    assert graph.notes == [
        "9,975 tasks are not drawn one by one: a column shows at most 25 tasks, and the "
        "rest of it as one “+N more” box."
    ]

    svg = render(graph)
    assert len(svg) < 100_000
    root = ET.fromstring(svg)
    assert len(root.findall(f".//{SVG}a")) == wg.MAX_COLUMN_TASKS + 2
    assert root.get("height") == str(graph.height) and graph.height < 2000


def test_a_long_chain_draws_its_first_columns_and_one_box_for_the_rest() -> None:
    jobs = [task(1, "t1")] + [task(i, f"t{i}", [i - 1]) for i in range(2, 101)]
    graph = wg.layout(jobs)
    assert graph.columns == 100
    assert len(graph.nodes) == wg.MAX_COLUMNS + 1
    tail = graph.nodes[-1]
    assert tail.job_id is None and tail.tasks == 100 - wg.MAX_COLUMNS
    assert len(graph.edges) == wg.MAX_COLUMNS  # t1->t2 ... t19->t20, t20->the rest
    assert graph.notes == [
        "Only the first 20 of 100 columns are drawn: the 80 tasks of the columns after "
        "them are one box."
    ]
    assert graph.width < (wg.MAX_COLUMNS + 1) * (wg.NODE_WIDTH + wg.COLUMN_GAP) + 2 * wg.MARGIN


def test_arrows_past_the_cap_are_counted_not_drawn() -> None:
    # Five columns of 25 tasks, each waiting for every task of the column before.
    width, jobs = wg.MAX_COLUMN_TASKS, []
    for c in range(5):
        before = [j.id for j in jobs[-width:]] if c else []
        jobs += [task(c * width + r + 1, f"c{c}r{r}", before) for r in range(width)]
    graph = wg.layout(jobs)
    assert graph.hidden_tasks == 0
    assert len(graph.edges) == wg.MAX_EDGES
    assert graph.notes == ["500 of 2,500 arrows are not drawn (at most 2,000 are)."]


# ------------------------------------------------------------------ text in the boxes


def test_long_names_are_clipped_in_the_box_and_whole_in_the_tooltip() -> None:
    name = "resize-every-image-of-the-catalogue"
    [node] = wg.layout([task(1, name, kind="resize")]).nodes
    assert node.label == name[: wg.LABEL_CHARS - 1] + "…" and len(node.label) == wg.LABEL_CHARS
    assert node.title.startswith(name + "\njob 1 · resize · pending")
    assert node.detail == "pending · resize"
    assert wg.clip("short") == "short"


@pytest.mark.parametrize(
    "name",
    [
        "<script>alert(1)</script>",
        '"><svg onload=alert(1)>',
        "a & b < c",
        "x\u202eevil\u2066",
        "]]><!--",
    ],
)
def test_task_names_are_text_in_the_svg(name: str) -> None:
    graph = wg.layout([task(1, name), task(2, name + "2", [1])])
    svg = render(graph)
    root = ET.fromstring(svg)  # well-formed: no name opened or closed an element
    assert {el.tag for el in root.iter()} <= {
        f"{SVG}{t}" for t in ("svg", "defs", "marker", "path", "g", "a", "title", "rect", "text")
    }
    assert not any(k.startswith("on") for el in root.iter() for k in el.attrib)
    titles = [el.text or "" for el in root.iter(f"{SVG}title")]
    shown = name.replace("\u202e", "\\u202e").replace("\u2066", "\\u2066")
    assert titles[0].startswith(shown + "\n")
    assert "\u202e" not in svg and "\u2066" not in svg
