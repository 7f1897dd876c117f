"""The line's runtime, with no PyTorch in it: the model card an export carries, the engines that run the graph
(ONNX Runtime, OpenVINO), the automatic runtime choice, the Predictor and the ``predict`` verb.

Nothing is imported here on purpose: a line PC imports only the modules it uses.
"""
