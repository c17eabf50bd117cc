# The ONNX model `simple` (examples/build_models.py) written for the Python backend: the same
# inputs, outputs, batching and math, OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 on
# INT32 [16]. bench/pipelines.py serves both to weigh the Python backend against ONNX Runtime.
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            out_0 = pb_utils.Tensor("OUTPUT0", np.add(in_0, in_1, dtype=np.int32))
            out_1 = pb_utils.Tensor("OUTPUT1", np.subtract(in_0, in_1, dtype=np.int32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out_0, out_1]))
        return responses
