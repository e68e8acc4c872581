"""Worker processes as the API process sees them.

``supervisor`` runs the pool's and the workers' lives (starts, deaths,
replacements, back-off, recycling, the shutdown ladder); ``groups`` are the
shared workers and each model's own; a group's launcher starts its workers,
behind one protocol (``launchers``): spawned processes, forks of a model
template (``forking``, which also restarts the template, and ``template``),
or Ray actors (``ray``); ``workers`` holds the handle of each; ``readers``
decides who reads each worker's pipe (the manager thread, a caller thread,
an event loop) and makes every loan end; ``stacks`` reads a worker's stacks
from outside; ``logs`` writes the workers' lives to the log.
Only the API process imports this package.
"""
