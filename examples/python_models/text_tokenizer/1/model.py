# The first step of the text pipeline: words -> token ids (a stable hash into a 1000-word
# vocabulary, as a stand-in for a real tokenizer), padded or cut to 16, with a mask of the
# real tokens.
import re
import zlib

import numpy as np
import triton_python_backend_utils as pb_utils

LENGTH = 16
VOCABULARY = 1000


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)[0]
            text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
            words = re.findall(r"\w+", text.lower())[:LENGTH]
            tokens = np.zeros(LENGTH, dtype=np.int64)
            mask = np.zeros(LENGTH, dtype=np.float32)
            for index, word in enumerate(words):
                tokens[index] = 1 + zlib.crc32(word.encode()) % (VOCABULARY - 1)  # 0 is padding
                mask[index] = 1.0
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("TOKENS", tokens), pb_utils.Tensor("MASK", mask)]
                )
            )
        return responses
