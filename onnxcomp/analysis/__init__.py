"""Read-only analyses of a model that passes, reports and ``onnxcomp inspect`` share."""
