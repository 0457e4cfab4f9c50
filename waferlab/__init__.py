"""waferlab: train, compare, explain and deploy wafer-map defect-pattern classifiers."""

from waferlab.errors import WaferlabError

__version__ = "0.1.0"
__all__ = ["WaferlabError", "__version__"]
