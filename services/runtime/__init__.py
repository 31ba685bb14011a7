"""The model runtime: load a published version and run it.

Used alike by the Serve deployments, `tuneserve eval`, the colocated ingress and the
benchmarks. Imports the core layer only; never grpc, never Ray Serve.
"""
