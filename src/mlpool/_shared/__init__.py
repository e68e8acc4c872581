"""One pool for several API processes (``share_across_processes``): the pool host
and the API processes attached to it.

- ``client``: the engine of an API process (``SharedEngine``), with
  ``submissions`` (what it sends for a job), ``calls`` (stats, stacks, reload)
  and ``spec`` (what the processes agree on, what a new host is given);
- ``rendezvous``: where the host listens, and how the first process starts it;
- ``host``: the host process; ``relay``: its side of one API process;
- ``channel`` and ``protocol``: the messages between them, with descriptors.
"""
