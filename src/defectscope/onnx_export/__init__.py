"""Export a run (PyTorch) to a self-describing, self-checked ONNX graph: the model, its Drift head, the int8
variant, a two-stage cascade. Imports torch; the runtime below it never does.
"""
