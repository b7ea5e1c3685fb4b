"""Log2 latency histograms (as the kernel keeps them in aggregation mode):
percentiles, and bcc-style rendering."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Log2Histogram:
    """counts[b] = packets whose value v had floor(log2(v)) == b (v = 0 in bucket 0)."""

    counts: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile_bucket(self, q: float) -> int:
        """The bucket holding the q-quantile (0 < q <= 1)."""
        rank, seen = max(1, round(q * self.total + 0.5 - 1e-9)), 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return b
        raise ValueError("empty histogram")

    @staticmethod
    def bounds(b: int) -> tuple[int, int]:
        """[low, high) of bucket b."""
        return (0 if b == 0 else 1 << b), 1 << (b + 1)

    def render(self, unit_ns: int = 1000, unit: str = "usecs", width: int = 40) -> list[str]:
        if not self.counts:
            return []
        peak = max(self.counts.values())
        lines = [f"{unit:>24} : count     distribution"]
        for b in range(min(self.counts), max(self.counts) + 1):
            lo, hi = self.bounds(b)
            n = self.counts.get(b, 0)
            bar = "*" * (n * width // peak) if n else ""
            lines.append(f"{lo / unit_ns:>10.3g} -> {hi / unit_ns:<10.3g} : {n:<9d}|{bar:<{width}}|")
        return lines


def bucket_of(value_ns: int) -> int:
    """The log2 bucket of a value, as the kernel computes it."""
    return max(value_ns, 1).bit_length() - 1
