"""flowlab: likelihood-based generative models on invertible maps, with exact likelihoods."""

from flowlab.errors import FlowlabError

__version__ = "0.2.0"
__all__ = ["FlowlabError", "__version__"]
