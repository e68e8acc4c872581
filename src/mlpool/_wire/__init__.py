"""What both sides share: messages, framing, serialization, shared memory.

``protocol`` (and ``template_protocol``) are the messages and their frames,
``transport`` moves them over sockets with descriptors, ``serialization``
pickles functions, arguments, results and exceptions, ``shm`` keeps large
buffers out of the pickle, and ``started`` is the word a worker writes when it
begins a job. Imports nothing from ``_api``, ``_engine``, ``_processes`` or
``_worker``: a worker loads it, so it must stay small and free of the API
process's code.
"""
