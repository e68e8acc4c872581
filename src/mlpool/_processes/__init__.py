"""Worker processes as the API process sees them.

``supervisor`` runs the pool's and the workers' lives (starts, deaths,
replacements, back-off, recycling, the shutdown ladder); ``groups`` are the
shared workers and each model's own; ``launchers`` start a group's workers
(spawned processes, forks of a model template through ``forking`` and
``template``, or Ray actors through ``ray``); ``workers`` holds the handle of
each; ``readers`` decides who reads each worker's pipe (the manager thread, a
caller thread, an event loop) and makes every loan end; ``stacks`` reads a
worker's stacks from outside; ``logs`` writes the workers' lives to the log.
Only the API process imports this package.
"""
