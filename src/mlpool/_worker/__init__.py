"""What runs in a worker process or a model template, and nothing else.

``main`` is a worker's life (thread limits, loading the models, serving jobs,
watching its parent), ``stream`` a stream's job on credit, ``memory`` the
check against ``max_memory_per_worker``, ``shm`` its side of shared memory,
``stacks`` its stacks on demand, ``template_main`` the template that forks
workers (``share_models``), ``ray_actor`` a worker as a Ray actor. A worker
imports only this package, ``_wire`` and ``mlpool.errors``
(``tests/unit/test_structure.py`` checks it).
"""
