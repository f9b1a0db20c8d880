"""The cluster table of the hsm head: which tokens share a cluster, built from unigram counts.

A table is a permutation of the vocabulary into "rows" (the order of the head's output weight)
plus cluster sizes: cluster c owns the contiguous rows offsets[c]:offsets[c+1]. It is stored as
three tensors (token → cluster, token → position within its cluster, cluster offsets) and every
cluster holds at least one token, since an empty cluster would keep probability mass that no
token receives.
"""

from __future__ import annotations

import torch


def even_sizes(n_items: int, n_clusters: int) -> torch.Tensor:
    """Sizes of n_clusters contiguous runs over n_items that differ by at most one."""
    sizes = torch.full((n_clusters,), n_items // n_clusters, dtype=torch.long)
    sizes[: n_items % n_clusters] += 1
    return sizes


def sizes_by_mass(mass: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Cut a frequency-sorted sequence of masses into n_clusters non-empty contiguous runs.

    The class RNNLM rule (Mikolov et al. 2011): walking the sequence, an item opens cluster k + 1
    once the mass before it exceeds (k + 1)/n_clusters of the total. An item heavier than a share
    gets a cluster of its own and the next clusters one item each until the cut points catch up;
    the last clusters are kept non-empty the same way. All-zero masses cut into even runs.
    """
    n = mass.numel()
    mass = mass.double()
    if mass.sum() <= 0:
        mass = torch.ones_like(mass)
    before = torch.cumsum(mass, 0) - mass  # mass strictly before each item
    k = torch.arange(1, n_clusters, dtype=torch.long)
    cuts = torch.searchsorted(before, k.double() * (mass.sum() / n_clusters), right=True)
    cuts = torch.cummax((cuts - k).clamp(min=0), 0).values + k  # each cluster ≥ 1 item
    cuts = torch.minimum(cuts, n - n_clusters + k)  # leave ≥ 1 item for every later cluster
    edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([n])])
    return edges.diff()


def default_clusters(vocab_size: int, n_clusters: int, shortlist: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row → token, cluster sizes) without counts: contiguous id ranges of near-equal size (BPE
    ids are roughly frequency-ordered), the first ``shortlist`` ids forming the first cluster."""
    order = torch.arange(vocab_size)
    if shortlist:
        return order, torch.cat([torch.tensor([shortlist]), even_sizes(vocab_size - shortlist, n_clusters - 1)])
    return order, even_sizes(vocab_size, n_clusters)


def frequency_clusters(
    counts: torch.Tensor, n_clusters: int, shortlist: int, binning: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row → token, cluster sizes) from unigram counts: tokens sorted by count (ties by id), the
    ``shortlist`` most frequent as the first cluster, the rest cut at equal shares of cumulative
    √count ("sqrt") or count ("unigram") mass."""
    order = torch.argsort(counts, descending=True, stable=True)
    mass = counts[order].double()
    if binning == "sqrt":
        mass = mass.sqrt()
    if shortlist:
        sizes = torch.cat([torch.tensor([shortlist]), sizes_by_mass(mass[shortlist:], n_clusters - 1)])
    else:
        sizes = sizes_by_mass(mass, n_clusters)
    return order, sizes


def table_from_rows(row_token: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored form of a table: token_cluster [V], token_position [V], cluster_offsets [C + 1]."""
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
    row_cluster = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    token_row = torch.empty_like(row_token)
    token_row[row_token] = torch.arange(row_token.numel())
    token_cluster = row_cluster[token_row]
    return {
        "token_cluster": token_cluster,
        "token_position": token_row - offsets[token_cluster],
        "cluster_offsets": offsets,
    }


def table_problem(table: dict[str, torch.Tensor], vocab_size: int, n_clusters: int) -> str | None:
    """What is wrong with a stored table for this vocabulary and cluster count, or None."""
    token_cluster, token_position, offsets = (table[k] for k in ("token_cluster", "token_position", "cluster_offsets"))
    for name, t, shape in (("token_cluster", token_cluster, [vocab_size]), ("token_position", token_position,
                           [vocab_size]), ("cluster_offsets", offsets, [n_clusters + 1])):
        if list(t.shape) != shape:
            return f"{name} has shape {list(t.shape)}, expected {shape}"
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            return f"{name} has dtype {t.dtype}, expected an integer type"
    token_cluster, token_position, offsets = token_cluster.long(), token_position.long(), offsets.long()
    sizes = offsets.diff()
    if offsets[0] != 0 or offsets[-1] != vocab_size or (sizes < 1).any():
        return f"cluster_offsets must rise from 0 to {vocab_size} with every cluster non-empty"
    if token_cluster.min() < 0 or token_cluster.max() >= n_clusters:
        return f"token_cluster has ids outside [0, {n_clusters})"
    if not torch.equal(torch.bincount(token_cluster, minlength=n_clusters), sizes):
        return "token_cluster does not match the cluster sizes in cluster_offsets"
    if token_position.min() < 0 or (token_position >= sizes[token_cluster]).any():
        return "token_position has positions outside their cluster"
    rows = offsets[token_cluster] + token_position
    if not torch.equal(torch.bincount(rows, minlength=vocab_size), torch.ones(vocab_size, dtype=torch.long)):
        return "two tokens share a position in the same cluster"
    return None
