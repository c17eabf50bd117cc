"""The process that hosts one instance of a model written for Triton's Python backend.

`python -m pystub --fd N` runs it: `protocol` is the wire to the worker,
`stub` loads model.py and serves execute calls, `triton_python_backend_utils` is the API that
model code imports under that name, and `mesh` carries BLS calls to other models over NATS.
Importing this package imports nothing heavy: the worker uses `protocol` from it.
"""
