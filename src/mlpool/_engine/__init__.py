"""The API process's engine: queues, workers' jobs, outcomes; one lock.

``engine.ProcessEngine`` owns the parts and the callers' entry points;
``manager_thread`` is its one wait on every pipe, death handle and wake-up
pipe. The parts, each the owner of its state: ``scheduler`` and ``fairqueue``
(lanes per priority, model and session; batches; pure), ``registry`` (job ids,
expiry, deadlines; pure), ``dispatch`` (what is sent to workers),
``replies`` (what workers send, whoever read it), ``recovery`` (what a
death, a deadline or the pool's end does to jobs),
``outcomes`` (decided under the lock, delivered after it, see ``lock``),
``results`` (a result unpickled in its caller's thread),
``jobs`` (the job record and its future), ``regions`` (the parent's shared
memory), ``streams`` (a stream's channel). ``inline`` is the engine without
processes (``nb_workers=0``). The engine drives ``_processes`` and speaks
``_wire``; it never imports ``_worker`` code to run it.
"""
