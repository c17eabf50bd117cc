"""natron: a Triton-compatible inference server built as an asyncio mesh on NATS.

This package is the shared vocabulary every service imports: errors with their protocol
status, datatypes and tensors, model configuration, settings, and the `natron` command.
"""

__version__ = "0.1.0"
