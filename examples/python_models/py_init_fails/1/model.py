# A model whose initialize() fails: UNAVAILABLE with the reason.
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError(f"no weights found for {args['model_name']} version {args['model_version']}")

    def execute(self, requests):
        return []
