# BLS with an async execute, in the style of Triton's async BLS example: two requests to the
# ONNX model `simple` run concurrently, the second with the inputs swapped, and
# OUTPUT0 = INPUT0 + INPUT1 (first call), OUTPUT1 = INPUT1 - INPUT0 (second call).
import asyncio

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().reshape(1, 16)
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy().reshape(1, 16)
            calls = [
                pb_utils.InferenceRequest(
                    model_name="simple",
                    requested_output_names=[name],
                    inputs=[pb_utils.Tensor("INPUT0", first), pb_utils.Tensor("INPUT1", second)],
                ).async_exec()
                for name, first, second in (("OUTPUT0", in_0, in_1), ("OUTPUT1", in_1, in_0))
            ]
            added, subtracted = await asyncio.gather(*calls)
            for answer in (added, subtracted):
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
            out_0 = pb_utils.get_output_tensor_by_name(added, "OUTPUT0").as_numpy()
            out_1 = pb_utils.get_output_tensor_by_name(subtracted, "OUTPUT1").as_numpy()
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT0", out_0.reshape(16)),
                        pb_utils.Tensor("OUTPUT1", out_1.reshape(16)),
                    ]
                )
            )
        return responses
