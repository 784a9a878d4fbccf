"""reclip_core — ReCLIP++ (Wang & Kang, arXiv 2408.06747) on open_clip.

One module per concept of the method; see docs/architecture.md.
"""
__version__ = "0.1.0"
