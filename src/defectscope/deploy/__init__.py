"""Deploy stage: export a run to a self-describing ONNX file, and a torch-free predictor that runs it.

Nothing is imported here on purpose: ``defectscope.deploy.predictor`` must load on machines without
PyTorch, and ``defectscope.deploy.export`` (which needs torch) must not be pulled in by it.
"""
