"""LM-mixup instruction distillation for the Hugging Face stack.

Importing the package registers its Hugging Face integrations: the ``mixture`` dataset builder
(``load_dataset("mixture", ...)``) and the ``instruction-distillation`` pipeline. Each registers
as soon as the library it extends is imported (right away if it already is), so ``import
lmmixup_hf`` itself stays cheap: ``transformers.pipelines`` alone takes seconds to import.
"""

from lmmixup_hf._hooks import when_imported

__version__ = "0.1.0"

when_imported("datasets", "lmmixup_hf.integrations.mixture")
when_imported("transformers.pipelines", "lmmixup_hf.distiller.hf_pipeline")
