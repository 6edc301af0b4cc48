"""Export: merge LoRA/DoRA checkpoints into standalone model folders (`merge`), ONNX graphs (`onnx_export`) and GGUF
files for llama.cpp (`gguf_export`)."""
