"""The messages between an API process and its pool host (``_shared.channel`` frames them).

Each is a tuple ``(kind, nfds, *fields)``; ``nfds`` descriptors travel with it.

API process -> host::

    HELLO   {fingerprint, pid}                       first, once
    SUBMIT  id, model, fn_id, fn_pickle|None, fn_name, data, spans, has_args_fd,
            has_offer_fd, timeout|None, retries, priority, batch|None,
            stream|None, interrupt                   fds: [arguments][, offer]
    CANCEL  id, interrupt
    CREDIT  id, items, bytes                         a stream's consumer took items
    CALL    call id, operation, arguments            stats, worker_stacks, reload

host -> API process::

    WELCOME {host_pid, processes, slots, max_queue_size}   or REFUSED message|None (ending)
    SHARE   processes                                how many API processes share the pool now
    DONE    id, data, spans, where                   fds: [the worker's own file] (where=NEW_FILE)
    FAILED  id, error, traceback                     the scoring function raised (as a worker sends it)
    ERROR   id, pickled exception                    the host's verdict: crash, timeout, pool broken
    GONE    id                                       cancelled
    END     id                                       a stream's generator ended
    ITEM    id, data, spans, where                   fds: [file] (where=NEW_FILE)
    ANSWER  call id, ok, pickled value or exception
    RELOADED {model: loader pickled}                 a reload_models succeeded: a host started
                                                     later (this one died) loads these

Every SUBMIT gets exactly one of DONE, FAILED, ERROR, GONE or END: the API
process gives the job's shared memory back to its own pool when a DONE,
FAILED, END or ERROR comes (the host and its worker were done with it
before they sent it), and never reuses it after GONE (a worker may still
hold a job cancelled while running).
"""

from __future__ import annotations

HELLO, SUBMIT, CANCEL, CREDIT, CALL = 1, 2, 3, 4, 5
WELCOME, REFUSED, SHARE, DONE, FAILED, ERROR, GONE, END, ITEM, ANSWER = 11, 12, 13, 14, 15, 16, 17, 18, 19, 20
RELOADED = 21

PROTOCOL_VERSION = 1
MAX_HELLO = 1 << 20  # bytes of a hello, at most: a peer's first message is read before anything is known of it
