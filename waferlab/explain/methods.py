"""The CAM methods waferlab offers (torch-free, so the CLI can list them without importing torch)."""

#: CLI method name -> pytorch-grad-cam class name.
METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
}
#: Display names for figure titles.
METHOD_TITLES: dict[str, str] = {
    "gradcam": "GradCAM", "gradcam++": "GradCAM++", "scorecam": "ScoreCAM", "eigencam": "EigenCAM",
    "layercam": "LayerCAM", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
}
