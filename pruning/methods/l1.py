"""L1-norm filter pruning (Li et al., ICLR 2017): the smallest-L1 filters go, as many as the budget asks."""

from __future__ import annotations

from pruning.allocation import fit_scores, masks_from_counts
from pruning.importance import L1Importance
from pruning.methods.api import MethodContext, Selection


def run(ctx: MethodContext) -> Selection:
    """Score filters by L1, keep the best ones allocated globally or uniformly, as many as the budget allows."""
    scores = L1Importance()(ctx.model, ctx.graph)
    counts = fit_scores(scores, ctx.graph.sizes, ctx.budget.fits, ctx.params.round_to, ctx.params.allocation)
    return Selection(ctx.model, masks_from_counts(scores, counts), scores, info={"allocation": ctx.params.allocation})
