"""The CAM methods waferlab offers (torch-free, so the CLI can list them without importing torch)."""

#: CLI method name -> pytorch-grad-cam class name. ``gradcam++exp`` is the attention study's own GradCAM++
#: (seeds.md A.5, the exp-score variant): weights computed by waferlab on the library's hooks.
METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "gradcam++exp": "GradCAM",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
}
#: Display names for figure titles.
METHOD_TITLES: dict[str, str] = {
    "gradcam": "GradCAM", "gradcam++": "GradCAM++", "gradcam++exp": "GradCAM++ (study, exp)",
    "scorecam": "ScoreCAM", "eigencam": "EigenCAM", "layercam": "LayerCAM", "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
}
