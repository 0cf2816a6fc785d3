"""`flatout bench`: load generator, workloads, serving metrics, tables, reports."""
