"""Maintenance services: moving due jobs, rescuing, cleaning. Leader-only once leader
election exists; until then each client runs the scheduler itself (it is safe to run
from many clients at once: it locks with SKIP LOCKED)."""
