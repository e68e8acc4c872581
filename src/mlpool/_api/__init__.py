"""What the caller holds: the pool, the job API, sessions, options, config, waits.

Runs in the API process, in the caller's thread or event loop, and owns no
thread of its own. ``pool.MLPool`` is the facade; ``jobapi.JobAPI`` writes
each job method once (sync and async), for the pool, its ``options()`` views
and its sessions; ``waiting`` and ``fetching`` are how a caller waits for a
job's handle and takes a job id's result; ``streams`` is the caller's side of
a stream (the iterators). Arguments are validated and pickled here, in the
caller's thread (``_engine.jobmaker``), so bad input fails in the caller's
stack. Calls go down into ``_engine``; nothing below calls back up here.
"""
