"""The numpy runtime: bundles, engines, samplers, tokenizer and pipeline. Never imports torch."""
from .errors import LdmExportError
from .spec import ComponentSpec, TensorSpec

__all__ = ["LdmExportError", "ComponentSpec", "TensorSpec"]
