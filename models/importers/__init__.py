"""Importers: turn checkpoints in other formats into Hugging Face directories that vLLM,
``transformers`` and the guide runtime (``models.runtime``) all load as they are."""

from models.importers.gguf import (
    CARD_NAME,
    SMOLLM2_INSTALL,
    UnsupportedArchitecture,
    import_gguf,
    import_smollm2,
    smollm2_gguf_file,
)

__all__ = [
    "CARD_NAME",
    "SMOLLM2_INSTALL",
    "UnsupportedArchitecture",
    "import_gguf",
    "import_smollm2",
    "smollm2_gguf_file",
]
