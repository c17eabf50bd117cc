"""Control plane: model repository scan, version policy, model states in a KV bucket."""
