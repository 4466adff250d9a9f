"""ipywidgets explorers built on saekit.analysis and saekit.viz. Each has `.widget` to display and
methods/attributes that tests (and notebooks) can drive from Python."""

from .absorption import AbsorptionExplorer
from .allocation import DEFAULT_TEXT, AllocationExplorer, ToyAllocationExplorer
from .base import Responsive
from .features import FeatureExplorer
from .runs import FrontierExplorer, TrainingMonitor

__all__ = [
    "AbsorptionExplorer",
    "DEFAULT_TEXT",
    "AllocationExplorer",
    "ToyAllocationExplorer",
    "Responsive",
    "FeatureExplorer",
    "FrontierExplorer",
    "TrainingMonitor",
]
