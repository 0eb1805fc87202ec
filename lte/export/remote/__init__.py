"""The code an exported checkpoint carries: ``configuration_lte.py``, ``modeling_lte.py`` and
``layout.py`` (the file layout, format 2; copied as ``lte_layout.py``).

``lte export`` copies them into the checkpoint (rewriting the ``BASE_ARCHITECTURE`` line), so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works where this project is
not installed. They import only torch, transformers and safetensors; keep it that way.
"""
