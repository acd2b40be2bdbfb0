"""How many samples each line of a stage's mixture takes, from each source.

One pure function serves the planner (over the sources' expected sizes) and the mixer at run time
(over the records that survived filtering), so a plan and a run can never disagree on the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recipec import ir


@dataclass(frozen=True)
class Problem:
    entry: str  # the mixture line at fault, or "" for the stage as a whole
    code: str  # the diagnostic code the compiler reports it under
    message: str
    hint: str | None = None
    capacity: bool = True  # judged against the sources' sizes (meaningless where a size is unknown)


@dataclass
class Allocation:
    by_entry: dict[str, dict[str, int]] = field(default_factory=dict)  # entry -> source -> samples
    total: int = 0
    problems: list[Problem] = field(default_factory=list)

    def by_source(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for per_source in self.by_entry.values():
            for source, n in per_source.items():
                totals[source] = totals.get(source, 0) + n
        return totals


def split_evenly(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` in proportion to `weights` with the largest-remainder rule (deterministic)."""
    keys = sorted(weights)
    mass = sum(weights[k] for k in keys)
    if total <= 0 or mass <= 0:
        return {k: 0 for k in keys}
    exact = {k: total * weights[k] / mass for k in keys}
    result = {k: int(exact[k]) for k in keys}
    leftover = total - sum(result.values())
    for k in sorted(keys, key=lambda k: (-(exact[k] - result[k]), k))[:leftover]:
        result[k] += 1
    return result


def part_size(available: int, k: int, n: int) -> int:
    """Size of the k-th (1-based) of n disjoint parts of `available` records: the first ones take the remainder."""
    base, extra = divmod(available, n)
    return base + (1 if k <= extra else 0)


def _water_fill(total: int, capacity: dict[str, int], min_share: float, max_share: float) -> dict[str, int]:
    """Equal shares per group, each capped by what the group has (and by max_share); leftovers move on."""
    groups = sorted(g for g, c in capacity.items() if c > 0)
    limit = {g: min(capacity[g], int(total * max_share)) for g in groups}
    granted = {g: 0 for g in groups}
    remaining = total
    open_groups = list(groups)
    while remaining > 0 and open_groups:
        each = split_evenly(remaining, {g: 1.0 for g in open_groups})
        progress = 0
        for g in open_groups:
            take = min(each[g], limit[g] - granted[g])
            granted[g] += take
            progress += take
        remaining -= progress
        open_groups = [g for g in open_groups if granted[g] < limit[g]]
        if progress == 0:
            break
    floor = int(total * min_share)
    for g in groups:
        if granted[g] < min(floor, capacity[g]):
            granted[g] = min(floor, capacity[g])
    return granted


def allocate(stage_mix: tuple[ir.MixEntry, ...], available: dict[str, dict[str, int]], *,
             samples: int | None, balance: ir.Balance | None = None,
             groups: dict[str, str] | None = None) -> Allocation:
    """Samples per entry and source.

    `available[entry_name]` maps each source behind the entry (a source, a synthesized set or a pool's
    members) to the records it can give. `groups` maps a source to its balancing group (its data type,
    category or itself) and is needed only with `balance`.
    """
    result = Allocation()
    fixed: dict[str, dict[str, int]] = {}
    shares: dict[str, float] = {}
    weights: dict[str, float] = {}

    for entry in stage_mix:
        pool = available.get(entry.name, {})
        have = sum(pool.values())
        if entry.kind == "all":
            fixed[entry.name] = dict(pool)
        elif entry.kind == "part":
            k, n = entry.part or (1, 1)
            fixed[entry.name] = {s: part_size(c, k, n) for s, c in pool.items()}
        elif entry.kind in ("count", "first", "random", "cap"):
            want = entry.count or 0
            if want > have and entry.kind != "cap":
                result.problems.append(Problem(entry.name, "E302", f"asks for {want:,} samples of `{entry.name}`, which has {have:,}",
                                               f"take `all` or `cap({_short(want)})`, or at most {_short(have)}"))
            fixed[entry.name] = split_evenly(min(want, have), pool) if pool else {}
        elif entry.kind == "share":
            shares[entry.name] = entry.share or 0.0
        elif entry.kind == "weight":
            weights[entry.name] = entry.weight or 0.0

    share_sum = sum(shares.values())
    if share_sum > 1.0 + 1e-9:
        result.problems.append(Problem("", "E301", f"shares add up to {share_sum * 100:.4g}%",
                                       "shares of a stage may add up to at most 100%", capacity=False))

    fixed_total = sum(sum(v.values()) for v in fixed.values())
    if (shares or weights or balance) and samples is None:
        result.problems.append(Problem("", "E106", "shares, weights and balancing need the stage's total",
                                       "add `samples = N` to the stage", capacity=False))
    total = samples if samples is not None else fixed_total

    if balance is not None and samples is not None:
        present = sorted({(groups or {}).get(source, source) for entry in stage_mix for source in available.get(entry.name, {})})
        if present and balance.max_share * len(present) < 1.0 - 1e-9:
            result.problems.append(Problem("", "E302", f"{len(present)} {_plural(balance.by)} at most {_percent(balance.max_share)} each "
                                           f"can fill only {100 * balance.max_share * len(present):.4g}% of the samples",
                                           f"raise `max_share` to at least {_percent(1 / len(present))}, or mix more {_plural(balance.by)}",
                                           capacity=False))
        if present and balance.min_share * len(present) > 1.0 + 1e-9:
            result.problems.append(Problem("", "E302", f"{len(present)} {_plural(balance.by)} at least {_percent(balance.min_share)} each "
                                           f"need {100 * balance.min_share * len(present):.4g}% of the samples",
                                           f"lower `min_share` to at most {_percent(1 / len(present))}", capacity=False))
        result.by_entry = _balanced(stage_mix, available, samples, balance, groups or {})
        result.total = sum(sum(v.values()) for v in result.by_entry.values())
        if result.total < samples and not any(p.code == "E302" for p in result.problems):
            result.problems.append(Problem("", "E302", f"balancing can fill only {result.total:,} of {samples:,} samples",
                                           "lower `samples` or add sources"))
        return result

    by_entry = dict(fixed)
    # one largest-remainder split of the shares' total, so that shares of 1/6 add up exactly
    share_counts = split_evenly(round(total * share_sum), shares) if shares else {}
    for name, share in shares.items():
        pool = available.get(name, {})
        want = share_counts[name]
        have = sum(pool.values())
        if want > have:
            result.problems.append(Problem(name, "E302", f"{share * 100:.4g}% of {total:,} is {want:,} samples of `{name}`, which has {have:,}"))
        by_entry[name] = split_evenly(min(want, have), pool)
    remaining = total - fixed_total - sum(sum(by_entry[n].values()) for n in shares)
    if weights:
        wanted = split_evenly(max(remaining, 0), weights)
        for name in weights:
            pool = available.get(name, {})
            have = sum(pool.values())
            if wanted[name] > have:
                result.problems.append(Problem(name, "E302", f"weight of `{name}` asks for {wanted[name]:,} samples, it has {have:,}"))
            by_entry[name] = split_evenly(min(wanted[name], have), pool)
    if samples is not None and not weights and not balance and share_sum <= 1.0 + 1e-9:
        realised = sum(sum(v.values()) for v in by_entry.values())
        if realised > samples:
            result.problems.append(Problem("", "E302", f"the mixture takes {realised:,} samples but the stage has `samples = {_short(samples)}`",
                                           "lower the counts or raise `samples`"))
        elif shares and realised < samples:
            # what shares and counts leave unfilled is known from the recipe alone, sizes aside
            written = sum(e.count or 0 for e in stage_mix if e.kind in ("count", "first", "random")) + sum(share_counts.values())
            sized = any(e.kind in ("all", "part", "cap") for e in stage_mix)
            arithmetic = not sized and written < samples
            if arithmetic or not any(p.code == "E302" for p in result.problems):
                result.problems.append(Problem("", "E302", f"the mixture fills {min(realised, written) if arithmetic else realised:,} "
                                               f"of the stage's {samples:,} samples"
                                               + (f" (shares add up to {share_sum * 100:.4g}%)" if share_sum < 1.0 - 1e-9 else ""),
                                               "make the shares add up to 100%, or let a line take the rest with `weight(1)`",
                                               capacity=not arithmetic))
    # keep the order the mixture was written in
    result.by_entry = {e.name: by_entry.get(e.name, {}) for e in stage_mix}
    result.total = sum(sum(v.values()) for v in result.by_entry.values())
    return result


def _balanced(stage_mix, available, samples, balance: ir.Balance, groups: dict[str, str]) -> dict[str, dict[str, int]]:
    """Equal samples per group (data type, category or source), capped by availability (water-filling)."""
    capacity: dict[str, int] = {}
    members: dict[str, dict[tuple[str, str], int]] = {}
    for entry in stage_mix:
        for source, count in available.get(entry.name, {}).items():
            if entry.kind == "part" and entry.part:
                count = part_size(count, *entry.part)
            elif entry.kind in ("count", "first", "random", "cap") and entry.count is not None:
                count = min(count, entry.count)
            group = groups.get(source, source)
            capacity[group] = capacity.get(group, 0) + count
            members.setdefault(group, {})[(entry.name, source)] = count
    granted = _water_fill(samples, capacity, balance.min_share, balance.max_share)
    by_entry: dict[str, dict[str, int]] = {e.name: {} for e in stage_mix}
    for group, amount in granted.items():
        keys = members[group]
        split = split_evenly(amount, {f"{e}\x00{s}": float(c) for (e, s), c in keys.items()})
        for key, n in split.items():
            entry, source = key.split("\x00")
            by_entry[entry][source] = by_entry[entry].get(source, 0) + n
    return by_entry


def _plural(by: str) -> str:
    return {"data_type": "data types", "source": "sources", "category": "categories"}.get(by, by)


def _percent(x: float) -> str:
    return f"{100 * x:.4g}%"


def _short(n: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale and (n * 10) % scale == 0:
            value = n / scale
            return f"{value:g}{suffix}"
    return str(n)
