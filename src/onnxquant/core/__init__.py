"""What every mode shares: errors, element types, numerics, the plan, graph and name helpers,
model I/O (the front door and the atomic save) and latency measurement.

Nothing in ``core`` imports from another room of the package.
"""
