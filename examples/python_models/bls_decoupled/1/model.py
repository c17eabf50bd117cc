# BLS to a decoupled model: `repeat` streams one response per element of IN, and this model
# collects the stream (exec(decoupled=True) iterates over the responses as they arrive) into
# one answer, OUT = the streamed values in order. With async execute the same works through
# `await request.async_exec(decoupled=True)` and `async for`.
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            stream = pb_utils.InferenceRequest(
                model_name="repeat",
                requested_output_names=["OUT"],
                inputs=[pb_utils.Tensor("IN", values)],
            ).exec(decoupled=True)
            collected = []
            for response in stream:
                if response.has_error():
                    raise pb_utils.TritonModelException(response.error().message())
                collected.append(int(pb_utils.get_output_tensor_by_name(response, "OUT").as_numpy()[0]))
            out = pb_utils.Tensor("OUT", np.array(collected, dtype=np.int32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
