"""The control plane: what is said to midway (an admin API call, a reload, a
signal) reaches every worker's data plane as data, and what the workers count
comes back and adds up in one place.  See docs/architecture.md ("The control
plane").

Modules: :mod:`.commands` (what is said to a worker, and the handle it is said
through), :mod:`.plan` (the difference between two targets, pure),
:mod:`.agent` (a worker's side: its runtime and metrics, carrying out
commands), :mod:`.plane` (the target, one change at a time, every worker),
:mod:`.channel` (the supervisor-worker channel), :mod:`.worker` (a worker
process), :mod:`.process` (midway as one process: signals, reload, admin API),
:mod:`.notify` (``sd_notify``).  The supervisor is :mod:`midway.workers`.
"""
