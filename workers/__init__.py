"""Worker process: device discovery, backends, the dynamic batcher and the pull loops."""
