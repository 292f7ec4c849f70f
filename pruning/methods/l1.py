"""L1-norm filter pruning (Li et al., ICLR 2017) with budget bisection."""

from __future__ import annotations

from pruning.budget import BudgetError, fit_ranking, global_ranking
from pruning.importance import group_weight_norms
from pruning.methods.context import MethodContext, MethodResult
from pruning.surgery import masks_from_counts, round_counts


def uniform_ranking(scores, sizes):
    """Channel order keeping about the same fraction of every group at every prefix (each group's best first)."""
    first, order = [], []
    for g, s in enumerate(scores):
        ranked = s.argsort(descending=True).tolist()
        first.append((g, ranked[0]))
        order += [((i + 0.5) / sizes[g], g, c) for i, c in enumerate(ranked[1:], start=1)]
    order.sort()
    return first + [(g, c) for _, g, c in order]


def run(ctx: MethodContext) -> MethodResult:
    """Score filters by L1, keep the best ones allocated globally or uniformly, as many as the budget allows."""
    scores = group_weight_norms(ctx.model, ctx.graph)
    sizes = ctx.graph.sizes
    ranking = global_ranking(scores) if ctx.params.allocation == "global" else uniform_ranking(scores, sizes)
    multiple = ctx.params.round_to

    def rounded(counts: list[int]) -> list[int]:
        return round_counts(counts, sizes, multiple)

    counts = fit_ranking(ranking, len(sizes), ctx.budget.fits, rounded if multiple > 1 else None)
    if not ctx.budget.fits(counts):
        raise BudgetError(f"no configuration rounded to multiples of {multiple} fits {ctx.budget.budget}")
    return MethodResult(ctx.model, masks_from_counts(scores, counts), scores,
                        info={"allocation": ctx.params.allocation})
