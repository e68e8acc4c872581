"""Shared test helpers: workloads run in workers, probes, real servers and the apps they serve, pool builders."""
