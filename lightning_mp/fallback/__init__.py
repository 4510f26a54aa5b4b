"""Layer-wise fp32 fallback: which modules (``filters``), how they run in fp32 (``islands``), when a module is
promoted and why (``promotion``), and what to do when skipping steps gets a run nowhere (``escalation``)."""

from lightning_mp.fallback.filters import ModuleFilter, by_name, by_type, fp32_filter, pattern_misses
from lightning_mp.fallback.islands import SCOPES, Scope, apply_fp32, fp32, is_fp32_island, island_scope, remove_fp32
from lightning_mp.fallback.promotion import FallbackManager, Promotion, PromotionRule

__all__ = [
    "SCOPES",
    "FallbackManager",
    "ModuleFilter",
    "Promotion",
    "PromotionRule",
    "Scope",
    "apply_fp32",
    "by_name",
    "by_type",
    "fp32",
    "fp32_filter",
    "is_fp32_island",
    "island_scope",
    "pattern_misses",
    "remove_fp32",
]
