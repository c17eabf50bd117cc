# The ways a Python model fails, chosen per request by MODE, for tests:
#   0 answers PID = the stub's process id      1 raises from execute()
#   2..5 answer a TritonError with the code INVALID_ARG, NOT_FOUND, UNSUPPORTED, UNAVAILABLE
#   6 answers a TritonError without a code     7 sleeps 60 s before answering (to be killed)
#   8 returns no response at all               9 answers with a list that is not a Tensor
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

CODES = {
    2: pb_utils.TritonError.INVALID_ARG,
    3: pb_utils.TritonError.NOT_FOUND,
    4: pb_utils.TritonError.UNSUPPORTED,
    5: pb_utils.TritonError.UNAVAILABLE,
}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            mode = int(pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy()[0])
            if mode == 1:
                raise ValueError("mode 1 asks execute() to fail")
            if mode in CODES:
                error = pb_utils.TritonError(f"mode {mode} answers an error", CODES[mode])
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            if mode == 6:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("mode 6 fails")))
                continue
            if mode == 7:
                time.sleep(60)
            if mode == 8:
                return []
            if mode == 9:
                responses.append(pb_utils.InferenceResponse(output_tensors=[[1, 2, 3]]))
                continue
            pid = pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int64))
            responses.append(pb_utils.InferenceResponse(output_tensors=[pid]))
        return responses
