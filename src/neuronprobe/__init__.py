"""neuronprobe: which neurons of a language model tell two word contexts apart, with statistics.

The pipeline is a straight line, one module per stage::

    text.open_corpus -> contexts.collect_contexts -> activations.extract_activations
        -> statistics.fit_neuron_logits -> tables / figures
        -> interventions.intervention_sweep -> decoding.decode_layers -> report.write_report

and :func:`run` does all of it into a run directory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuronprobe.config import RunConfig
    from neuronprobe.contexts import Contrast
    from neuronprobe.decoding import decode_layers
    from neuronprobe.errors import NeuronprobeError
    from neuronprobe.interventions import intervention_sweep
    from neuronprobe.pipeline import RunResult, decode, intervene, probe, run
    from neuronprobe.statistics import NeuronFits, fit_neuron_logits

# Imported on first use, so that `neuronprobe --help` and input checks do not wait for torch.
_EXPORTS = {
    "Contrast": "neuronprobe.contexts",
    "NeuronFits": "neuronprobe.statistics",
    "NeuronprobeError": "neuronprobe.errors",
    "RunConfig": "neuronprobe.config",
    "RunResult": "neuronprobe.pipeline",
    "decode": "neuronprobe.pipeline",
    "decode_layers": "neuronprobe.decoding",
    "fit_neuron_logits": "neuronprobe.statistics",
    "intervene": "neuronprobe.pipeline",
    "intervention_sweep": "neuronprobe.interventions",
    "probe": "neuronprobe.pipeline",
    "run": "neuronprobe.pipeline",
}

__all__ = [
    "Contrast",
    "NeuronFits",
    "NeuronprobeError",
    "RunConfig",
    "RunResult",
    "decode",
    "decode_layers",
    "fit_neuron_logits",
    "intervene",
    "intervention_sweep",
    "probe",
    "run",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neuronprobe' has no attribute {name!r}")
