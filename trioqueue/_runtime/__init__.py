"""The running client: one nursery tree, opened by `tree.Runtime.run`.

How to find your way:

- ``tree.py``: the whole tree in one ``run()``, every part built when the ``Runtime`` is;
  the queue keeper and stop watcher live here too. Start reading here.
- ``producer.py``: one per queue; the fetch loop (cooldown, polling, backpressure).
- ``claimed.py``: a producer's claimed jobs and the worker tasks that run them
  (``ClaimedJobs``: take, ended, hand back).
- ``executor.py``: runs one job after another in a lane and turns whatever each did into
  one outcome (hooks, middleware, the error handler).
- ``lane.py``: the cancel scope the jobs of one worker task share, and ``JobHandle``.
- ``completer.py``: outcomes in through ``OutcomeSender`` handles, batched writes,
  events out.
- ``dispatcher.py``: events to subscriptions, never blocking; ``Audience``.
- ``notifier.py``: the one LISTEN connection and its callbacks.
- ``startup.py``: start-up retries of transient database faults.

What a finished run does to its row is decided in ``trioqueue/_outcome.py``, and what a
failed attempt records in ``trioqueue/_failure.py``: pure modules the maintenance
services use too.
"""
