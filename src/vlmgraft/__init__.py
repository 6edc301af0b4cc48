"""vlmgraft: give any language model eyes.

Pipeline folders: `graft` (model surgery and audit), `data` (readers, images, collation, shapes world), `train`
(staged training), `export` (merge, ONNX), `infer` (chat, detect, serve), `eval` (metrics and reports).
"""

__version__ = "0.1.0"
