"""GradSentry backdoor-sample detection for LLM fine-tuning data, with a Dagster integration.

The scoring modules (``data``, ``prompts``, ``spectral``, ``scoring``, ``thresholds``, ``gate``,
``scan``) do not import Dagster; ``assets``, ``resources`` and ``definitions`` do.
"""

__version__ = "0.1.0"
