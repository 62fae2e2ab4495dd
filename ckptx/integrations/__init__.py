"""Bridges to other frameworks, each imported only by those who use it.

- `ckptx.integrations.mmengine`: the `Ckptx` weight initializer for OpenMMLab configs (`custom_imports`).
- `ckptx.integrations.hf`: HuggingFace model folders (`config.json` + `model.safetensors`) as output.
"""
