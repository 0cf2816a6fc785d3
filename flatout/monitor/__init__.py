"""Monitoring: step timing in the engine, NVML, Prometheus scraping, `flatout top`."""
