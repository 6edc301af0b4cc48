"""Export: merge LoRA/DoRA checkpoints into standalone model folders (`merge`) and ONNX graphs (`onnx_export`)."""
