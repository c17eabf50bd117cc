# The last step of the text pipeline: mean of the token embeddings under the mask, then
# L2-normalised, so that texts compare by cosine similarity.
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            embeddings = pb_utils.get_input_tensor_by_name(request, "EMBEDDINGS").as_numpy()
            mask = pb_utils.get_input_tensor_by_name(request, "MASK").as_numpy()
            if mask.sum() == 0:
                error = pb_utils.TritonError("the text has no words", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            pooled = (embeddings * mask[:, None]).sum(axis=0) / mask.sum()
            pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("EMBEDDING", pooled.astype(np.float32))]
                )
            )
        return responses
