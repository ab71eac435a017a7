"""Training losses: PCME++ (PSM's probabilistic loss), the InfoNCE baselines, and the tri-modal combiner.

`TriModalLoss` is what the trainer uses; the pair functions are the tested building blocks.
"""

from psm.losses.distributed import (
    OFFICIAL_LABEL_SMOOTHING,
    all_gather_with_grad,
    dist_world,
    official_infonce_pair,
    official_matched,
    official_pcmepp_pair,
    own_block_first,
)
from psm.losses.infonce import (
    GeoCLAPInfoNCECriterion,
    InfoNCECriterion,
    infonce_pair_loss,
)
from psm.losses.pcmepp import (
    PCMEPPCriterion,
    PCMEPPTerms,
    calibrated_shift,
    csd,
    pcmepp_pair_loss,
    pcmepp_pair_terms,
    vib_kl,
)
from psm.losses.trimodal import DEFAULT_PAIR_WEIGHTS, MODALITIES, PAIRS, TriModalLoss

__all__ = [
    "DEFAULT_PAIR_WEIGHTS",
    "MODALITIES",
    "OFFICIAL_LABEL_SMOOTHING",
    "PAIRS",
    "GeoCLAPInfoNCECriterion",
    "InfoNCECriterion",
    "PCMEPPCriterion",
    "PCMEPPTerms",
    "TriModalLoss",
    "all_gather_with_grad",
    "calibrated_shift",
    "csd",
    "dist_world",
    "infonce_pair_loss",
    "official_infonce_pair",
    "official_matched",
    "official_pcmepp_pair",
    "own_block_first",
    "pcmepp_pair_loss",
    "pcmepp_pair_terms",
    "vib_kl",
]
