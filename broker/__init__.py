"""Everything NATS: the embedded server, subject and header names, the wire codec, stream and
KV setup, the capacity-driven pull loop, and the request client used by gateway and SDK users.

Only this package spells subject or header names.
"""
