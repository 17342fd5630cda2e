"""edgeslim: shrink a pretrained LLM for one application until it fits a device, export it, prove it runs.

One `edgeslim export` run, top to bottom, is `exporter.pipeline.run`:
profile -> plan -> select (collect + choose bases) -> factorize -> export -> validate -> report.
"""

__version__ = "0.1.0"
