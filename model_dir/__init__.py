"""The model directory: what the exporter writes and the server loads, torch-free and onnx-free.

- `model_dir.schema`: the `model.json` schema and the loader that checks a directory against it;
- `model_dir.self_check`: the stored self-check (inputs, reference outputs, the gates) both sides run;
- `model_dir.reconstruction`: the decoder's `pred` back to pictures, and the reconstruction panel.

`training/` (the exporter, the model card) and `service/` (the server) both import this package;
it imports neither of them (numpy and pydantic only: the panel is drawn in numpy).
"""
