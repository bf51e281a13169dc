"""Maintenance services: the elected leader's housekeeping, and periodic jobs.

How to find your way:

- ``elector.py``: leader election; while this client leads, its nursery runs the
  services below (but not periodic jobs).
- ``scheduler.py``: scheduled and retryable jobs that are due become available.
- ``rescuer.py``: jobs left running by a dead client go back to work (or are discarded,
  or cancelled).
- ``cleaner.py``: deletes old finalized jobs, and queues nobody announced for a day.
- ``periodic.py``: every client's periodic jobs, each run claimed once across clients
  and inserted through the client's ``InsertBuilder``.
- ``loop.py``: the jittered interval loop they share.

Each service runs as well from several clients at once: the statements lock with SKIP
LOCKED or compare-and-set, so leadership only saves work.
"""
