"""neuronprobe: which neurons of a language model tell two word contexts apart, with statistics.

The pipeline is a straight line, one module per stage::

    text.open_corpus -> contexts.collect_contexts -> activations.extract_activations
        -> statistics.fit_neuron_logits -> tables / figures

and :func:`run` does all of it into a run directory.
"""

from neuronprobe.config import RunConfig
from neuronprobe.contexts import Contrast
from neuronprobe.errors import NeuronprobeError
from neuronprobe.pipeline import RunResult, run
from neuronprobe.statistics import NeuronFits, fit_neuron_logits

__all__ = [
    "Contrast",
    "NeuronFits",
    "NeuronprobeError",
    "RunConfig",
    "RunResult",
    "fit_neuron_logits",
    "run",
]
__version__ = "0.1.0"
