"""Deployment: trustworthy outputs (calibration, operating point, unknown patterns), ONNX export, streaming
``predict`` on a fab's own files and a self-contained HTML gallery."""

#: Export formats of ``waferlab export`` (declared here, torch-free, for the CLI's choices).
EXPORT_FORMATS: tuple[str, ...] = ("onnx",)
#: Precisions of ``waferlab export --quantize``: ``none`` keeps the float32 graph (the default); ``int8`` is
#: static QDQ quantisation of the network's ops, calibrated on maps the run knows (waferlab.deploy.quantize).
QUANTIZE_MODES: tuple[str, ...] = ("none", "int8")
#: About how many maps ``--quantize int8`` calibrates its activation ranges on (a stratified sample).
DEFAULT_CALIB_MAPS = 512
