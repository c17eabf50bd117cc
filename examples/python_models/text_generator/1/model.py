# A streaming text generator: greedy decoding with the small decoder model `text_decoder`
# (an ONNX model built by examples/build_text_models.py: token id -> next-token logits), called
# through BLS once per token; each token goes to the client as its own response, and the stream
# stops early when the client goes away (is_cancelled).
import threading
import zlib

import numpy as np
import triton_python_backend_utils as pb_utils

# The decoder's vocabulary: 64 syllables. Token 0 ends the text.
SYLLABLES = ["<end>", *[c + v for c in "bdfghklmnprst" for v in "aeiou"][:63]]


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0]
            prompt = prompt if isinstance(prompt, bytes) else str(prompt).encode()
            limit = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
            max_tokens = int(limit.as_numpy().reshape(-1)[0]) if limit is not None else 16
            thread = threading.Thread(target=self.generate, args=(request, prompt, max_tokens))
            thread.start()
            self.threads.append(thread)
        return None

    def generate(self, request, prompt, max_tokens):
        sender = request.get_response_sender()
        token = 1 + zlib.crc32(prompt) % (len(SYLLABLES) - 1)
        try:
            for _ in range(max_tokens):
                if request.is_cancelled():
                    break
                decode = pb_utils.InferenceRequest(
                    model_name="text_decoder",
                    requested_output_names=["LOGITS"],
                    inputs=[pb_utils.Tensor("TOKEN", np.array([token], dtype=np.int64))],
                )
                answer = decode.exec()
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
                logits = pb_utils.get_output_tensor_by_name(answer, "LOGITS").as_numpy()
                token = int(np.argmax(logits))
                if token == 0:
                    break
                word = np.array([SYLLABLES[token].encode()], dtype=np.object_)
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("TOKEN", word)]))
        except Exception as exc:  # the error reaches the client and ends the stream
            error = pb_utils.TritonError(str(exc))
            sender.send(
                pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
            return
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=5)
