# A decoupled model in the style of Triton's `repeat` example: for each element of IN it sends
# one response (OUT = the element, IDX = its position), DELAY_MS apart, from a thread of its
# own after execute() has returned, then closes the stream with the final flag alone. When the
# client goes away (is_cancelled()), it stops early.
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_MS")
            delay_s = float(delay.as_numpy()[0]) / 1000 if delay is not None else 0.0
            sender = request.get_response_sender()
            thread = threading.Thread(target=self.send, args=(sender, values.copy(), delay_s))
            thread.start()
            self.threads.append(thread)
        return None

    def send(self, sender, values, delay_s):
        for index, value in enumerate(values):
            if delay_s:
                time.sleep(delay_s)
            if sender.is_cancelled():
                break
            out = pb_utils.Tensor("OUT", np.array([value], dtype=np.int32))
            idx = pb_utils.Tensor("IDX", np.array([index], dtype=np.uint32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out, idx]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=5)
