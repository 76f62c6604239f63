"""What a structure is: structural sites, fix_structure, families, Bayesian modules, networks."""

from __future__ import annotations

from .bayesian import BayesianModule, batched_call
from .family import (
    GraphFamily,
    MixedOp,
    conv_family,
    derive_network,
    one_hidden_layer,
    two_hidden_layer,
)
from .fix_messenger import FixStructureMessenger, fix_structure
from .full_data import FullDataMessenger, full_data
from .network import NetworkModel
from .plate import data_plate, shard_plate
from .sites import StructuralSite, find_structural_sites, structural_prior, structure

__all__ = [
    "BayesianModule",
    "FixStructureMessenger",
    "FullDataMessenger",
    "GraphFamily",
    "MixedOp",
    "NetworkModel",
    "StructuralSite",
    "batched_call",
    "conv_family",
    "data_plate",
    "derive_network",
    "find_structural_sites",
    "fix_structure",
    "full_data",
    "one_hidden_layer",
    "shard_plate",
    "structural_prior",
    "structure",
    "two_hidden_layer",
]
