"""Deployment: trustworthy outputs (calibration, operating point, unknown patterns), ONNX export, streaming
``predict`` on a fab's own files and a self-contained HTML gallery."""

#: Export formats of ``waferlab export`` (declared here, torch-free, for the CLI's choices).
EXPORT_FORMATS: tuple[str, ...] = ("onnx",)
