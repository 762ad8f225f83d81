"""Importers of third-party formats into ordinary Hugging Face checkpoint folders.

They sit above ``io/`` and below the CLI: the core (``io/``, ``engine/``) never reads a foreign format, it
reads the checkpoint these write. ``outdir`` is the output folder both share (refusing foreign files, the
``--overwrite`` mark); ``gguf_import`` dequantizes llama.cpp GGUF files; ``onnx_graph`` indexes an ONNX
graph and ``onnx_dinov2`` recognizes a DINOv2 backbone in it.
"""
