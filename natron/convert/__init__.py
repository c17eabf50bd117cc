"""`natron convert`: Model Navigator's conversion for natron. PyTorch and TensorFlow models become
ONNX (and TensorRT plans on a GPU), checked against the source, and a Triton model folder."""
