"""A workflow's tasks laid out as a graph, for the dashboard's workflow page to draw as SVG.

Pure and synchronous: `layout` takes the workflow's jobs (``client.workflow_get``) and
returns where every box and arrow goes; the template ``workflow_graph.html`` draws them,
so every value shown passes the dashboard's one escaping hook like any other page's.

The layout:

- **Columns.** A task's column is the length of the longest path of deps from a root (a
  task with no deps in the workflow) to it: roots are column 1, a task whose deepest dep is
  in column *n* is in column *n* + 1. Deps always name tasks added earlier, so the deps
  form a DAG; should stored rows ever disagree (a cycle), the tasks on or after it are
  drawn together in one column after the others, and a note says so.
- **Order in a column.** The first column in the order the tasks were added (job id);
  each next column by the mean position of each task's deps in their own columns, then by
  job id. The order depends only on the graph, never on states, so the page's refresh does
  not move the boxes.
- **Arrows** go from each dep to its dependent, one arrow per pair of boxes; an arrow is
  solid once every dep behind it completed. Between neighbouring columns an arrow is a
  curve; one that skips columns runs along a lane above the boxes (below, when both its
  ends are in the lower half), turning in the gaps between columns, so that no arrow
  ever crosses a box and seems to end in it.
- **Caps**, so that a workflow of any size draws in bounded time and space: a column
  shows at most `MAX_COLUMN_TASKS` tasks, the rest of it as one "+N more" box; at most
  `MAX_COLUMNS` columns are drawn, the tasks of later columns as one box after them; at
  most `MAX_EDGES` arrows are drawn. Every cap that applies adds a sentence to ``notes``.
  A 10,000-task fan-out with one fan-in task is drawn as 25 boxes, a "+9,975 more" box and
  the fan-in task.

A dep that is not a task of the workflow (a unique job that stood in for a task, or a dep
since deleted) has no box; it is listed as ``job N`` with the task's deps.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any, Final, final

import attrs

from ..job import Job, JobState

__all__ = [
    "COLUMN_GAP",
    "LABEL_CHARS",
    "MAX_COLUMNS",
    "MAX_COLUMN_TASKS",
    "MAX_EDGES",
    "NODE_HEIGHT",
    "NODE_WIDTH",
    "Edge",
    "Node",
    "TaskRow",
    "WorkflowGraph",
    "layout",
]

NODE_WIDTH: Final = 184
NODE_HEIGHT: Final = 40
COLUMN_GAP: Final = 72
"""Horizontal space between two columns of boxes, where the arrows run."""
ROW_GAP: Final = 12
LANE_GAP: Final = 8
"""Space between the lanes, above and below the boxes, of the arrows that skip columns."""
MAX_LANES: Final = 6
"""Lanes above the boxes, and as many below; more arrows than that share them."""
MARGIN: Final = 16
LABEL_CHARS: Final = 24
"""The longest task name (or other line) drawn in a box; longer ones end in "…" (the box's
tooltip and the task table show the whole name)."""
MAX_COLUMN_TASKS: Final = 25
"""Tasks drawn one by one in a column; the rest of a column is one "+N more" box."""
MAX_COLUMNS: Final = 20
"""Columns drawn; the tasks of any later column are one box after them."""
MAX_EDGES: Final = 2000
"""Arrows drawn, at most."""


@final
@attrs.frozen
class TaskRow:
    """One task, for the task table: its name, its job, its column (0-based) and its deps
    by task name (``job N`` for a dep that is not a task of the workflow)."""

    name: str
    job: Job[Any]
    column: int
    deps: tuple[str, ...]


@final
@attrs.frozen
class Node:
    """One box: a task (``job_id`` set, ``state`` its job's state) or a group of tasks not
    drawn one by one (``job_id`` None, ``state`` ``"more"``). ``title`` is the tooltip,
    ``label`` and ``detail`` the box's two lines, already shortened."""

    x: int
    y: int
    label: str
    detail: str
    title: str
    state: str
    job_id: int | None
    tasks: int
    """How many tasks the box stands for (1 for a task's own box)."""


@final
@attrs.frozen
class Edge:
    """One arrow, from the middle of a box's right side to the middle of another's left
    side, through ``points``; ``done`` when every dep it stands for completed.

    Two points: boxes in neighbouring columns, joined by a curve. Six: an arrow that
    skips columns, which leaves its box level, goes up or down in the gap after the
    box's column to a lane above or below every box, along it, and down or up in the gap
    before the target's column: it never crosses a box."""

    points: tuple[tuple[int, int], ...]
    done: bool

    @property
    def x1(self) -> int:
        return self.points[0][0]

    @property
    def y1(self) -> int:
        return self.points[0][1]

    @property
    def x2(self) -> int:
        return self.points[-1][0]

    @property
    def y2(self) -> int:
        return self.points[-1][1]

    @property
    def path(self) -> str:
        """The SVG path data."""
        if len(self.points) == 2:
            bend = COLUMN_GAP * 6 // 10
            return (
                f"M{self.x1},{self.y1} C{self.x1 + bend},{self.y1} "
                f"{self.x2 - bend},{self.y2} {self.x2},{self.y2}"
            )
        return "M" + " L".join(f"{x},{y}" for x, y in self.points)


@final
@attrs.frozen
class WorkflowGraph:
    """The drawing (``width`` by ``height`` pixels of ``nodes`` and ``edges``), every task
    in column order (``tasks``), the task count per state, and ``notes``: one sentence
    per cap that left something undrawn."""

    width: int
    height: int
    nodes: list[Node]
    edges: list[Edge]
    tasks: list[TaskRow]
    columns: int
    states: dict[JobState, int]
    notes: list[str]

    @property
    def hidden_tasks(self) -> int:
        """Tasks drawn in a group box instead of their own."""
        return sum(n.tasks for n in self.nodes if n.job_id is None)


def clip(text: str, limit: int = LABEL_CHARS) -> str:
    """``text``, cut to ``limit`` characters with a final "…" when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _name(job: Job[Any]) -> str:
    return job.workflow_task if job.workflow_task is not None else f"job {job.id}"


def _columns(
    by_id: Mapping[int, Job[Any]], deps: Mapping[int, list[int]]
) -> tuple[dict[int, int], int]:
    """Each task's column (longest path from a root, by Kahn's algorithm), and how many
    tasks were left over because their deps go round in a cycle (put in one extra column
    after all the others)."""
    waiting = {i: len(d) for i, d in deps.items()}
    dependents: dict[int, list[int]] = {i: [] for i in by_id}
    for i, ds in deps.items():
        for d in ds:
            dependents[d].append(i)
    column = dict.fromkeys(by_id, 0)
    ready = deque(i for i in by_id if waiting[i] == 0)
    done = 0
    while ready:
        i = ready.popleft()
        done += 1
        for child in dependents[i]:
            column[child] = max(column[child], column[i] + 1)
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    left = len(by_id) - done
    if left:
        last = max((column[i] for i in by_id if waiting[i] == 0), default=-1) + 1
        for i in by_id:
            if waiting[i]:
                column[i] = last
    return column, left


def _ordered(column: Mapping[int, int], deps: Mapping[int, list[int]]) -> list[list[int]]:
    """The task ids of each column, in drawing order (see the module docstring)."""
    count = max(column.values(), default=-1) + 1
    members: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(column):
        members[column[i]].append(i)
    position: dict[int, float] = {}

    def key(i: int) -> tuple[float, int]:
        placed = [position[d] for d in deps[i] if d in position]
        return (sum(placed) / len(placed) if placed else 0.0, i)

    for ids in members:
        ids.sort(key=key)
        for index, i in enumerate(ids):
            position[i] = index / len(ids)
    return members


def _state_counts(jobs: Iterable[Job[Any]]) -> Counter[JobState]:
    return Counter(job.state for job in jobs)


def _counts_text(counts: Counter[JobState], most: int | None = None) -> str:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].value))
    return " · ".join(f"{n:,} {state.value}" for state, n in ranked[:most])


def layout(jobs: Iterable[Job[Any]]) -> WorkflowGraph:
    """Lay out the tasks ``jobs`` (a workflow's, as ``client.workflow_get`` returns them).

    Deterministic: the same tasks give the same boxes and arrows in the same places,
    whatever their states. Bounded: at most ``MAX_COLUMNS + 1`` columns of at most
    ``MAX_COLUMN_TASKS + 1`` boxes, and ``MAX_EDGES`` arrows, whatever the number of tasks
    and deps; the work is linear in tasks plus deps (plus sorting).
    """
    by_id = {job.id: job for job in sorted(jobs, key=lambda j: j.id)}
    deps = {
        i: list(dict.fromkeys(d for d in job.workflow_deps if d in by_id and d != i))
        for i, job in by_id.items()
    }
    column, cyclic = _columns(by_id, deps)
    members = _ordered(column, deps)

    tasks = [
        TaskRow(
            name=_name(by_id[i]),
            job=by_id[i],
            column=c,
            deps=tuple(
                _name(by_id[d]) if d in by_id else f"job {d}" for d in by_id[i].workflow_deps
            ),
        )
        for c, ids in enumerate(members)
        for i in ids
    ]

    # Which box each task is drawn in: its own (box key = its id), its column's "+N more"
    # box (key -1 - column), or the box of every column past MAX_COLUMNS (key -1 - MAX).
    box_of: dict[int, int] = {}
    boxes: list[list[int]] = []  # per drawn column: the box keys, top to bottom
    grouped: dict[int, list[int]] = {}  # group key -> task ids
    for c, ids in enumerate(members):
        if c >= MAX_COLUMNS:
            key = -1 - MAX_COLUMNS
            if key not in grouped:
                grouped[key] = []
                boxes.append([key])
            grouped[key].extend(ids)
            box_of.update(dict.fromkeys(ids, key))
            continue
        shown, rest = ids[:MAX_COLUMN_TASKS], ids[MAX_COLUMN_TASKS:]
        keys = list(shown)
        box_of.update((i, i) for i in shown)
        if rest:
            grouped[-1 - c] = rest
            keys.append(-1 - c)
            box_of.update(dict.fromkeys(rest, -1 - c))
        boxes.append(keys)

    # Where each box goes: its column, and its top within the band of boxes.
    tallest = max((len(keys) for keys in boxes), default=0)
    pitch = NODE_HEIGHT + ROW_GAP
    band = max(tallest * pitch - ROW_GAP, 0)
    column_of: dict[int, int] = {}
    offset: dict[int, int] = {}
    for c, keys in enumerate(boxes):
        top = (tallest - len(keys)) * pitch // 2
        for row, key in enumerate(keys):
            column_of[key] = c
            offset[key] = top + row * pitch

    pairs, total_edges = _pairs(by_id, deps, box_of)
    # Arrows that skip columns take a lane above the boxes, or below when both ends sit
    # in the lower half; lanes are dealt out in turn.
    lane: dict[tuple[int, int], tuple[bool, int]] = {}
    used = [0, 0]  # arrows above, below
    for source, target in pairs:
        if column_of[target] - column_of[source] > 1:
            below = offset[source] + offset[target] + NODE_HEIGHT > band
            lane[(source, target)] = (below, used[below] % MAX_LANES)
            used[below] += 1
    above_lanes, below_lanes = (min(n, MAX_LANES) for n in used)
    first = MARGIN + above_lanes * LANE_GAP

    where: dict[int, tuple[int, int]] = {}
    nodes: list[Node] = []
    for key, c in column_of.items():
        x, y = MARGIN + c * (NODE_WIDTH + COLUMN_GAP), first + offset[key]
        where[key] = (x, y)
        if key >= 0:
            nodes.append(_task_node(x, y, by_id[key]))
        else:
            nodes.append(_group_node(x, y, [by_id[i] for i in grouped[key]]))

    edges = []
    for (source, target), all_done in pairs.items():
        (x1, y1), (x2, y2) = where[source], where[target]
        start = (x1 + NODE_WIDTH, y1 + NODE_HEIGHT // 2)
        end = (x2, y2 + NODE_HEIGHT // 2)
        route = lane.get((source, target))
        if route is None:
            edges.append(Edge((start, end), all_done))
            continue
        below, index = route
        level = (
            first + band + LANE_GAP // 2 + index * LANE_GAP
            if below
            else MARGIN + LANE_GAP // 2 + (above_lanes - 1 - index) * LANE_GAP
        )
        out, back = start[0] + COLUMN_GAP // 2, end[0] - COLUMN_GAP // 2
        points = (start, (out, start[1]), (out, level), (back, level), (back, end[1]), end)
        edges.append(Edge(points, all_done))

    notes: list[str] = []
    in_groups = sum(len(grouped[k]) for k in grouped if k != -1 - MAX_COLUMNS)
    if in_groups:
        notes.append(
            f"{in_groups:,} tasks are not drawn one by one: a column shows at most "
            f"{MAX_COLUMN_TASKS} tasks, and the rest of it as one “+N more” box."
        )
    if (tail := grouped.get(-1 - MAX_COLUMNS)) is not None:
        notes.append(
            f"Only the first {MAX_COLUMNS} of {len(members)} columns are drawn: the "
            f"{len(tail):,} tasks of the columns after them are one box."
        )
    if total_edges > len(pairs):
        notes.append(
            f"{total_edges - len(pairs):,} of {total_edges:,} arrows are not drawn "
            f"(at most {MAX_EDGES:,} are)."
        )
    if cyclic:
        notes.append(
            f"The deps of {cyclic:,} tasks go round in a cycle, which a workflow cannot "
            "have: those tasks are drawn together in the last column."
        )

    width = MARGIN * 2 + len(boxes) * NODE_WIDTH + max(len(boxes) - 1, 0) * COLUMN_GAP
    height = first + band + below_lanes * LANE_GAP + MARGIN
    return WorkflowGraph(
        width=width,
        height=height,
        nodes=nodes,
        edges=edges,
        tasks=tasks,
        columns=len(members),
        states=dict(_state_counts(by_id.values())),
        notes=notes,
    )


def _task_node(x: int, y: int, job: Job[Any]) -> Node:
    name = _name(job)
    title = f"{name}\njob {job.id} · {job.kind} · {job.state.value}"
    if job.workflow_deps:
        title += f"\n{len(job.workflow_deps)} dep{'s' if len(job.workflow_deps) != 1 else ''}"
    return Node(
        x=x,
        y=y,
        label=clip(name),
        detail=clip(f"{job.state.value} · {job.kind}"),
        title=title,
        state=job.state.value,
        job_id=job.id,
        tasks=1,
    )


def _group_node(x: int, y: int, jobs: list[Job[Any]]) -> Node:
    counts = _state_counts(jobs)
    return Node(
        x=x,
        y=y,
        label=f"+{len(jobs):,} more tasks",
        detail=clip(_counts_text(counts, most=2), LABEL_CHARS + 6),
        title=f"{len(jobs):,} more tasks: {_counts_text(counts)}",
        state="more",
        job_id=None,
        tasks=len(jobs),
    )


def _pairs(
    by_id: Mapping[int, Job[Any]], deps: Mapping[int, list[int]], box_of: Mapping[int, int]
) -> tuple[dict[tuple[int, int], bool], int]:
    """The arrows to draw, as (dep's box, dependent's box) -> whether every dep behind it
    completed: at most MAX_EDGES, in task order; and how many arrows there are in all."""
    done: dict[tuple[int, int], bool] = {}
    for i, ds in deps.items():
        to = box_of[i]
        for d in ds:
            pair = (box_of[d], to)
            if pair[0] == to:
                continue
            completed = by_id[d].state is JobState.COMPLETED
            done[pair] = done.get(pair, True) and completed
    kept = dict(list(done.items())[:MAX_EDGES]) if len(done) > MAX_EDGES else done
    return kept, len(done)
