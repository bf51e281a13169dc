"""Flow control cases of the driver conformance suite about partitions: how jobs get
theirs whatever the insert path, when the limits change, and when equal JSON values
differ in form; and what `queue_list` reports per partition. ``driver_suite.py`` imports
this module at its end (after ``driver_suite_limits.py``, whose helpers it uses), so
these cases join ``SUITE`` and run against every driver.
"""

from __future__ import annotations

from datetime import timedelta

from driver_suite import ID, NOW, STATE, at, case, ids, insert, insert_one, params
from driver_suite_limits import complete, fetch, fresh_queue, jobs_of, limits, queue_row

from trioqueue.driver.protocol import Driver
from trioqueue.limits import GlobalLimit, PartitionInfo, RateLimit

# ------------------------------------------------------------------------ insert paths, new limits


@case
async def limited_fetch_partitions_jobs_of_every_insert_path(driver: Driver) -> None:
    # Jobs inserted before the limits were stored, by the fast path after, and one by one:
    # all partitioned alike. Customer 1's backlog comes first and fills the walk.
    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_args=("customer",)))
    early = await jobs_of(driver, q, *[{"args": {"customer": 1}} for _ in range(40)])
    await driver.queue_upsert(q, NOW, lim)
    fast = [params(queue=q, args={"customer": 1}) for _ in range(40)]
    fast += [params(queue=q, args={"customer": 2}, scheduled_at=at(1))]
    assert await driver.job_insert_fast(fast, [], NOW) == 41
    [one] = await jobs_of(driver, q, {"args": {"customer": 3}, "scheduled_at": at(1)})
    found = await fetch(driver, q, lim, at(2), most=10)
    assert len(found.rows) == 3
    assert ids(found.rows) == [early[0], found.rows[1][ID], one]
    assert found.rows[1].args == {"customer": 2}


@case
async def limited_fetch_follows_changed_limits(driver: Driver) -> None:
    # The clients are reconfigured (a deploy): per customer, then per kind. The jobs
    # waiting, and running, are partitioned by what the fetch is given.
    q = fresh_queue()
    by_customer = limits(GlobalLimit(1, by_args=("customer",)))
    by_kind = limits(GlobalLimit(1, by_kind=True))
    await driver.queue_upsert(q, NOW, by_customer)
    job = await jobs_of(
        driver,
        q,
        {"kind": "a", "args": {"customer": 1}},
        {"kind": "a", "args": {"customer": 2}},
        {"kind": "b", "args": {"customer": 2}},
        {"kind": "b", "args": {"customer": 3}},
    )
    assert ids((await fetch(driver, q, by_customer, at(1))).rows) == [job[0], job[1], job[3]]
    for done in (job[1], job[3]):
        await complete(driver, done, at(2))
    await driver.queue_upsert(q, at(3), by_kind)
    # Kind a runs job 0: full. Kind b has room for job 2.
    assert ids((await fetch(driver, q, by_kind, at(4))).rows) == [job[2]]
    row = await queue_row(driver, q)
    assert row.limits == by_kind
    assert row.partitions == (
        PartitionInfo({"kind": "a"}, 1, 0),
        PartitionInfo({"kind": "b"}, 1, 0),
    )


@case
async def limited_fetch_partitions_a_retried_job_by_the_limits_of_now(driver: Driver) -> None:
    # A job finished under one set of limits and retried (by hand) under another is
    # partitioned by the limits the fetch is given, as the jobs that never finished are.
    q = fresh_queue()
    by_customer = limits(GlobalLimit(1, by_args=("customer",)))
    by_kind = limits(GlobalLimit(1, by_kind=True))
    await driver.queue_upsert(q, NOW, by_customer)
    [old] = await jobs_of(driver, q, {"kind": "a", "args": {"customer": 1}})
    assert ids((await fetch(driver, q, by_customer, at(1))).rows) == [old]
    await complete(driver, old, at(2))
    await driver.queue_upsert(q, at(3), by_kind)
    [new] = await jobs_of(driver, q, {"kind": "a", "args": {"customer": 2}})
    assert ids((await fetch(driver, q, by_kind, at(4))).rows) == [new]
    retried = await driver.job_retry(old, at(5))
    assert retried is not None and retried[STATE] == "available"
    # Kind a is full (the new job runs): the retried job waits.
    found = await fetch(driver, q, by_kind, at(6))
    assert (ids(found.rows), found.held_back) == ([], True)
    await complete(driver, new, at(7))
    assert ids((await fetch(driver, q, by_kind, at(8))).rows) == [old]


# ------------------------------------------------------------------------ queue rows


@case
async def queue_upsert_stores_limits_and_queue_list_reports_them(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(2, by_kind=True, by_args=("customer",)), RateLimit(5, 1.5))
    assert await driver.queue_upsert(q, NOW, lim) is False
    row = await queue_row(driver, q)
    assert (row.limits, row.held_back, row.partitions) == (lim, 0, ())
    rate_only = limits(rate_limit=RateLimit(1, 60.0, by_args=("a", "b")))
    await driver.queue_upsert(q, at(1), rate_only)
    assert (await queue_row(driver, q)).limits == rate_only
    # A client working the queue without limits clears them.
    await driver.queue_upsert(q, at(2))
    row = await queue_row(driver, q)
    assert (row.limits, row.held_back, row.partitions) == (None, 0, ())


@case
async def queue_list_reports_held_back_jobs_and_partitions(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(2, by_args=("customer",)))
    await driver.queue_upsert(q, NOW, lim)
    await jobs_of(
        driver,
        q,
        *[{"args": {"customer": 1}} for _ in range(4)],
        *[{"args": {"customer": 2}} for _ in range(3)],
        *[{"args": {"customer": 3}} for _ in range(2)],
        {"args": {}},
    )
    await insert_one(driver, queue=q, args={"customer": 1}, scheduled_at=at(10**8))  # not due
    # Customers 1, 2 and 3 run two each (1 and 2 hold jobs back), the null one one.
    found = await fetch(driver, q, lim, at(1))
    assert len(found.rows) == 7
    row = await queue_row(driver, q)
    assert (row.available, row.running) == (4, 7)
    assert row.held_back == 3  # customer 1: two, customer 2: one; not the future job
    assert row.partitions == (
        PartitionInfo({"args.customer": 1}, 2, 2),
        PartitionInfo({"args.customer": 2}, 2, 1),
        PartitionInfo({"args.customer": 3}, 2, 0),
        PartitionInfo({"args.customer": None}, 1, 0),
    )
    # Unpartitioned: one partition, {}.
    q2 = fresh_queue()
    lim2 = limits(GlobalLimit(1))
    await driver.queue_upsert(q2, NOW, lim2)
    await jobs_of(driver, q2, {}, {}, {})
    await fetch(driver, q2, lim2)
    row = await queue_row(driver, q2)
    assert (row.held_back, row.partitions) == (2, (PartitionInfo({}, 1, 2),))


@case
async def queue_list_shows_the_ten_busiest_partitions(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(3, by_kind=True))
    await driver.queue_upsert(q, NOW, lim)
    # Kind kN has N jobs running (up to the limit 3) and N - 3 held back; 14 kinds.
    for n in range(1, 15):
        await jobs_of(driver, q, *[{"kind": f"k{n:02}"} for _ in range(n)])
    await fetch(driver, q, lim, most=1000)
    row = await queue_row(driver, q)
    assert row.held_back == sum(n - 3 for n in range(4, 15))
    # By running (desc) first, then held back (desc).
    expected = [(f"k{n:02}", 3, n - 3) for n in range(14, 5, -1)] + [("k05", 3, 2)]
    assert [(p.partition["kind"], p.running, p.held_back) for p in row.partitions] == expected


@case
async def queue_list_reports_a_rate_limit_window(driver: Driver) -> None:
    # queue_list reads the driver's clock: start the jobs at it.
    now = driver.clock()
    q = fresh_queue()
    lim = limits(rate_limit=RateLimit(2, 3600.0, by_kind=True))
    await driver.queue_upsert(q, now, lim)
    await insert(driver, *[params(queue=q, kind=k, scheduled_at=now) for k in "aaaab"], now=now)
    found = await fetch(driver, q, lim, now)
    assert len(found.rows) == 3
    assert found.next_open == now + timedelta(seconds=3600)
    row = await queue_row(driver, q)
    assert row.held_back == 2
    # With only a rate limit, the partitions are its own.
    assert row.partitions == (
        PartitionInfo({"kind": "a"}, 2, 2),
        PartitionInfo({"kind": "b"}, 1, 0),
    )
    for job in found.rows:
        await complete(driver, job[ID], now)
    # Ended, but started within the window: kind a is still held back.
    row = await queue_row(driver, q)
    assert (row.running, row.held_back) == (0, 2)
    assert row.partitions == (PartitionInfo({"kind": "a"}, 0, 2),)


# ------------------------------------------------------------------------ equal values, other forms


@case
async def limited_fetch_equal_json_numbers_are_one_partition(driver: Driver) -> None:
    # 1 and 1.0 are the same JSON number (jsonb compares them equal, and so does Python):
    # one customer, one partition.
    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_args=("customer",)))
    job = await jobs_of(driver, q, {"args": {"customer": 1}}, {"args": {"customer": 1.0}})
    found = await fetch(driver, q, lim)
    assert ids(found.rows) == job[:1] and found.held_back


@case
async def limited_fetch_values_inside_objects_and_arrays_compare_by_their_json_text(
    driver: Driver,
) -> None:
    # A top-level number is written without trailing zeros (1 and 1.0 are one partition),
    # but values inside an object or array keep their JSON text: {"id": 1} and
    # {"id": 1.0} are two partitions, on both drivers, counted and ranked alike.
    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_args=("customer",)))
    await driver.queue_upsert(q, NOW, lim)
    job = await jobs_of(
        driver,
        q,
        {"args": {"customer": {"id": 1}}},
        {"args": {"customer": {"id": 1.0}}},
        {"args": {"customer": [2]}},
        {"args": {"customer": [2.0]}},
        {"args": {"customer": {"id": 1}}},
    )
    found = await fetch(driver, q, lim)
    assert ids(found.rows) == job[:4] and found.held_back
    # And the jobs running count for their own partitions only: nothing more.
    found = await fetch(driver, q, lim, at(1))
    assert (ids(found.rows), found.held_back) == ([], True)
