"""The code an exported checkpoint carries: ``configuration_lte.py`` and ``modeling_lte.py``.

``lte export`` copies both files into the checkpoint (rewriting the ``BASE_ARCHITECTURE``
line), so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works where
this project is not installed. They import only torch and transformers; keep it that way.
"""
