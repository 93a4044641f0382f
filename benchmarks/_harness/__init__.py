"""What the benchmark scripts share: variants and model widths, result files, Markdown, targets.

The scripts run as ``python benchmarks/<name>.py``, so ``benchmarks/`` is on ``sys.path`` and this
package imports as ``_harness``.
"""
