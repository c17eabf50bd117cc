# Business logic scripting in the style of Triton's BLS example: the model named by MODEL_NAME
# (the ONNX model `simple`, say) computes OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1.
# The call travels through natron's mesh like any other request.
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            model_name = pb_utils.get_input_tensor_by_name(request, "MODEL_NAME").as_numpy()[0]
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            # `simple` batches: it takes [batch, 16].
            infer_request = pb_utils.InferenceRequest(
                model_name=model_name.decode("utf-8"),
                requested_output_names=["OUTPUT0", "OUTPUT1"],
                inputs=[
                    pb_utils.Tensor("INPUT0", in_0.reshape(1, 16)),
                    pb_utils.Tensor("INPUT1", in_1.reshape(1, 16)),
                ],
            )
            infer_response = infer_request.exec()
            if infer_response.has_error():
                raise pb_utils.TritonModelException(infer_response.error().message())
            out_0 = pb_utils.get_output_tensor_by_name(infer_response, "OUTPUT0").as_numpy()
            out_1 = pb_utils.get_output_tensor_by_name(infer_response, "OUTPUT1").as_numpy()
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT0", out_0.reshape(16)),
                        pb_utils.Tensor("OUTPUT1", out_1.reshape(16)),
                    ]
                )
            )
        return responses
