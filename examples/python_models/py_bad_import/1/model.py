# A model whose import fails: it must be UNAVAILABLE with the reason, and the worker must go on
# serving every other model.
import natron_no_such_module  # noqa: F401


class TritonPythonModel:
    def execute(self, requests):
        return []
