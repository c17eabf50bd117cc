# Every datatype through the Python backend: each input INPUT_<DT> that a request carries comes
# back as OUTPUT_<DT>, unchanged (BYTES as bytes objects, BOOL as numpy bools, BF16 as
# ml_dtypes.bfloat16). config.pbtxt is written by examples/build_backend_models.py.
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            outputs = []
            for tensor in request.inputs():
                name = "OUTPUT_" + tensor.name().removeprefix("INPUT_")
                if name in request.requested_output_names():
                    outputs.append(pb_utils.Tensor(name, tensor.as_numpy()))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
