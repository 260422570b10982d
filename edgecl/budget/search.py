"""The search behind :class:`~edgecl.budget.planner.Planner`: a linear memory model and the knobs in order.

Given a prober (:class:`~edgecl.budget.probe.Prober`, or any object with its ``train_step``/``eval_step``
and figures: the tests use a formula), :class:`Search` fits, per (precision, r), the saved activations as a
line in the micro-batch and the measured runtime overhead, and predicts::

    peak(m) = baseline + optimizer + max(S(m) + overhead, evaluation) + input batch

then picks the largest micro-batch that fits (balanced chunks), then a higher r, then a lower precision,
probing lazily, and verifies the choice with a probe step at its own micro-batch. Pure logic over probe
results: it measures nothing itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgecl.budget.allocator import allocator_description, allocator_tracks_live_tensors
from edgecl.budget.memory import MIB
from edgecl.budget.plan import BudgetError, Plan
from edgecl.methods.base import Method
from edgecl.precision import autocast_works

if TYPE_CHECKING:
    from edgecl.budget.probe import Prober

__all__ = ["HEADROOM_MIN_MB", "UNTUNED_FACTOR", "Search"]

HEADROOM_MIN_MB = 24.0
"""Smallest automatic headroom: what probes cannot see. Measured peaks exceeded the prediction by up to
+11 MB on the shared dataset (the baseline creeps ~2 MB per task: kernels for new shapes, small-object heap)
and once by +17.6 MB on the tiny test model (file-backed RSS: torch's code pages, mapped as they first run,
grew 39 MB over a run and depend on the page cache)."""
UNTUNED_FACTOR = 1.75
"""Margin on measured increments when glibc's allocator is left at its defaults (measured fragmentation up
to 1.7x)."""


@dataclass
class _Fit:
    """Linear model of one (precision, r) configuration, per meter (``rss`` and, on CUDA, ``cuda``)."""

    precision: str
    rate: float | None
    saved_slope: dict[str, float]
    saved_intercept: dict[str, float]
    overhead: dict[str, float]
    linearity_error: float | None
    probed: dict[int, dict[str, float]]

    def saved(self, meter: str, m: int) -> float:
        """Saved activations at micro-batch ``m`` (the line through the probes)."""
        return self.saved_intercept[meter] + self.saved_slope[meter] * m

    def measured_line(self, meter: str, m: int) -> float | None:
        """The measured step increments, piecewise linear in the micro-batch through the probed sizes
        (extended from the two largest); None with fewer than two probed sizes.

        With every tensor its own mapping the increment beyond the saved activations is a constant;
        with freed memory reused inside a heap it grows with the micro-batch (freed transients stay
        resident until the step ends), which this line follows and a constant overhead would not."""
        points = sorted((k, v[meter]) for k, v in self.probed.items() if meter in v)
        if len(points) < 2:
            return None
        lo, hi = points[-2], points[-1]
        for a, b in zip(points, points[1:], strict=False):
            if a[0] <= m <= b[0]:
                lo, hi = a, b
                break
        return lo[1] + (hi[1] - lo[1]) / (hi[0] - lo[0]) * (m - lo[0])

    def train_inc(self, meter: str, m: int) -> float:
        """Predicted step increment at ``m``: the model, the measured line, or the measurement itself."""
        model = self.saved(meter, m) + self.overhead[meter]
        line = self.measured_line(meter, m)
        if line is not None:
            model = max(model, line)
        measured = self.probed.get(m, {}).get(meter)
        return max(model, measured) if measured is not None else model


def _balanced(batch: int, micro: int) -> int:
    """The smallest micro-batch with as many chunks as ``micro`` (equal-sized chunks, same step count)."""
    steps = math.ceil(batch / micro)
    return math.ceil(batch / steps)


class Search:
    """Probes lazily, in the order of the knobs; :meth:`plan` returns the :class:`Plan` or raises."""

    def __init__(
        self,
        method: Method,
        prober: Prober,
        scope: str,
        budget_mb: float | None,
        batch: int,
        *,
        headroom: float | None,
        eval_batch_size: int,
        train_images: int | None,
        verify: bool,
    ) -> None:
        self.method = method
        self.prober = prober
        self.scope = scope
        self.budget_mb = budget_mb
        self.batch = batch
        self.headroom_fixed = headroom
        self.eval_bs = eval_batch_size
        self.verify = verify
        self.cuda = prober.cuda
        self.meters = ["rss", "cuda"] if self.cuda else ["rss"]
        self.act_meter = "cuda" if self.cuda else "rss"
        adam = getattr(method.cfg, "optimizer", "adam") == "adam"
        self.opt_mb = (2.0 if adam else 0.0) * prober.trainable_bytes / MIB
        self.grad_mb = prober.grad_bytes / MIB
        self.input_mb = 2.0 * batch * math.prod(prober.image_shape) * 4 / MIB  # collated batch + device copy
        per_image = method.backbone.embed_dim * 4 + 8
        self.cache_mb = (train_images or 0) * per_image / MIB if method.phase2_cacheable() else 0.0
        self.probes: list[dict[str, Any]] = []
        self.fits: dict[tuple[str, float | None], _Fit] = {}
        self.eval_runs: dict[str, dict[int, dict[str, float]]] = {}
        self.decisions: list[str] = []
        self.candidates: list[dict[str, Any]] = []
        self.idle = {"rss": prober.idle_rss, "cuda": prober.idle_cuda}
        self.idle_budgeted = self.budgeted(self.idle)
        self.factor = 1.0 if allocator_tracks_live_tensors() or self.cuda else UNTUNED_FACTOR
        if self.factor != 1.0:
            self.decisions.append(
                f"allocator not tuned: measured increments x{self.factor} for heap fragmentation "
                "(set tune_allocator: true for a tighter, measured plan)"
            )

    # ---- the model ---------------------------------------------------------------------------------
    def on_device(self, meter: str) -> bool:
        """Whether ``meter`` measures the training device (where tensors, gradients and state live)."""
        return (meter == "cuda") == self.cuda

    def budgeted(self, peaks: dict[str, float]) -> float:
        """The quantity the budget covers."""
        if self.scope == "rss":
            return peaks["rss"]
        if self.scope == "cuda":
            return peaks["cuda"]
        return peaks["rss"] + peaks["cuda"]

    def peaks(
        self, fit: _Fit, m: int, ev: dict[str, float], measured: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Predicted peaks per meter: training at micro-batch ``m`` (or its ``measured`` increments) or
        evaluation, whichever is higher."""
        out = {}
        for meter in self.meters:
            dev = self.on_device(meter)
            train = measured[meter] if measured is not None else fit.train_inc(meter, m)
            evaluation = ev[meter] + self.cache_mb * dev
            inc = max(train, evaluation) * (self.factor if meter == "rss" else 1.0)
            out[meter] = self.idle[meter] + self.opt_mb * dev + inc + self.input_mb * dev
        return out

    def headroom(self, peak: float) -> float:
        """Margin kept below the budget: given, or max(24 MB, 10% of the peak above the idle baseline)."""
        if self.headroom_fixed is not None:
            return float(self.headroom_fixed)
        return max(HEADROOM_MIN_MB, 0.10 * (peak - self.idle_budgeted))

    def required(self, peak: float) -> float:
        """The budget a predicted peak needs."""
        return peak + self.headroom(peak)

    def fits_budget(self, peak: float) -> bool:
        """Whether a predicted peak plus headroom is within the budget."""
        return self.budget_mb is None or self.required(peak) <= self.budget_mb

    # ---- probes -------------------------------------------------------------------------------------
    def _record(self, kind: str, precision: str, rate: float | None, res: dict[str, float]) -> None:
        entry: dict[str, Any] = {"kind": kind, "precision": precision}
        if kind != "eval":
            entry["reduction_rate"] = rate
        entry.update({k: round(v, 3) for k, v in res.items()})
        self.probes.append(entry)

    def fit_for(self, precision: str, rate: float | None) -> _Fit:
        """The linear model of one (precision, r), from probe steps at micro-batches (1,) 2 and 4."""
        key = (precision, rate)
        if key in self.fits:
            return self.fits[key]
        sizes = sorted({1, min(2, self.batch), min(4, self.batch)})
        if self.fits and len(sizes) > 2:
            sizes = sizes[1:]  # the runtime is warm: two sizes give the slope
        runs = {}
        first = not self.fits
        for m in sizes:
            runs[m] = self.prober.train_step(m, precision, rate, optimizer_step=first and m == sizes[0])
            self._record("train", precision, rate, runs[m])
        slope, icpt, lin_err = {}, {}, None
        for meter in self.meters:
            s = {m: runs[m][f"saved_{meter}"] for m in sizes}
            if len(sizes) >= 2:
                a, b = sizes[-2], sizes[-1]
                slope[meter] = max(0.0, (s[b] - s[a]) / (b - a))
                icpt[meter] = s[a] - slope[meter] * a
                first = sizes[0]
                if len(sizes) >= 3 and meter == self.act_meter and s[first] > 0:
                    lin_err = abs(icpt[meter] + slope[meter] * first - s[first]) / s[first]
            else:
                slope[meter], icpt[meter] = s[sizes[0]] / sizes[0], 0.0
        overhead = {
            meter: max(0.0, *(runs[m][f"delta_{meter}"] - runs[m][f"saved_{meter}"] for m in sizes))
            for meter in self.meters
        }
        probed = {m: {meter: runs[m][f"delta_{meter}"] for meter in self.meters} for m in sizes}
        fit = _Fit(precision, rate, slope, icpt, overhead, lin_err, probed)
        if lin_err is not None and lin_err > 0.05:
            self.decisions.append(
                f"saved activations are not linear in the micro-batch ({lin_err:.1%} off at m={sizes[0]}); "
                "the chosen micro-batch is verified with its own probe step"
            )
        self.fits[key] = fit
        return fit

    def eval_probe(self, precision: str, bs: int) -> dict[str, float]:
        """Measured increments of an evaluation forward of ``bs`` images (probed once)."""
        runs = self.eval_runs.setdefault(precision, {})
        if bs not in runs:
            res = self.prober.eval_step(bs, precision)
            self._record("eval", precision, None, res)
            runs[bs] = {meter: res[f"delta_{meter}"] for meter in self.meters}
        return runs[bs]

    def eval_inc(self, precision: str, bs: int) -> dict[str, float]:
        """Evaluation increment at batch ``bs``: measured, or linear through batches 1 and 8."""
        small = min(8, self.eval_bs)
        d1, d2 = self.eval_probe(precision, 1), self.eval_probe(precision, small)
        runs = self.eval_runs[precision]
        out = {}
        for meter in self.meters:
            if bs in runs:
                value = runs[bs][meter]
            else:
                slope = max(0.0, (d2[meter] - d1[meter]) / (small - 1)) if small > 1 else 0.0
                below = [runs[k][meter] for k in runs if k < bs]
                value = max([d1[meter] + slope * (bs - 1), *below])
            out[meter] = value + self.grad_mb * self.on_device(meter)  # gradients outlive the last step
        return out

    def verify_micro(self, fit: _Fit, micro: int, ev: dict[str, float]) -> int | None:
        """Probe the chosen micro-batch itself; shrink it while the measurement does not fit."""
        while True:
            if micro not in fit.probed:
                res = self.prober.train_step(micro, fit.precision, fit.rate)
                self._record("verify", fit.precision, fit.rate, res)
                fit.probed[micro] = {meter: res[f"delta_{meter}"] for meter in self.meters}
                for meter in self.meters:  # the model may not predict less than was measured
                    gap = res[f"delta_{meter}"] - (fit.saved(meter, micro) + fit.overhead[meter])
                    fit.overhead[meter] += max(0.0, gap)
            if self.fits_budget(self.budgeted(self.peaks(fit, micro, ev))):
                return micro
            smaller = next(
                (
                    m
                    for m in range(micro - 1, 0, -1)
                    if self.fits_budget(self.budgeted(self.peaks(fit, m, ev)))
                ),
                None,
            )
            if smaller is None:
                return None
            micro = _balanced(self.batch, smaller)

    # ---- the search ---------------------------------------------------------------------------------
    def minimum(self, precision: str, rate: float | None) -> float:
        """Smallest budget for ``precision`` and ``rate``: micro-batch 1, evaluation in batches of 1."""
        return self.required(
            self.budgeted(self.peaks(self.fit_for(precision, rate), 1, self.eval_inc(precision, 1)))
        )

    def refuse(self, need: float, how: str, autocast: bool) -> BudgetError:
        """The error for a budget nothing fits."""
        unusable = "".join(f"; {d}" for d in self.decisions if "crashed a test process" in d)
        return BudgetError(
            f"memory budget {self.budget_mb:.0f} MB is too small to train {self.method.name} "
            f"(batch {self.batch}) on {self.prober.device}: idle baseline {self.idle_budgeted:.0f} MB; "
            f"the smallest budget that would work is {math.ceil(need)} MB "
            f"({how}{'' if autocast else '; autocast not allowed'}{unusable})",
            minimum_mb=float(math.ceil(need)),
        )

    def choose(self, precision: str, rate: float | None) -> tuple[_Fit, int, int, dict[str, float]] | None:
        """Largest micro-batch (and eval batch) that fits with ``precision`` and ``rate``; None if none."""
        fit = self.fit_for(precision, rate)
        bs = self.eval_bs
        ev = self.eval_inc(precision, bs)
        no_eval = dict.fromkeys(self.meters, 0.0)
        train_fits = self.fits_budget(self.budgeted(self.peaks(fit, 1, no_eval)))
        while train_fits and bs > 1 and not self.fits_budget(self.budgeted(self.peaks(fit, 1, ev))):
            bs = max(1, bs // 2)
            ev = self.eval_inc(precision, bs)
        ok = [m for m in range(self.batch, 0, -1) if self.fits_budget(self.budgeted(self.peaks(fit, m, ev)))]
        micro = _balanced(self.batch, ok[0]) if ok else None
        self.candidates.append(
            {
                "precision": precision,
                "reduction_rate": rate,
                "eval_batch_size": bs,
                "micro_batch_size": micro,
                "peak_micro_1_mb": round(self.budgeted(self.peaks(fit, 1, ev)), 1),
                "peak_full_batch_mb": round(self.budgeted(self.peaks(fit, self.batch, ev)), 1),
            }
        )
        if micro is None or not self.verify:
            return None if micro is None else (fit, micro, bs, ev)
        micro = self.verify_micro(fit, micro, ev)
        if micro is None:
            return None

        # evaluation predicted from small probes: measure it at the chosen batch when it could matter
        def eval_could_break(ev: dict[str, float]) -> bool:  # were the extrapolation 25% low
            worse = {k: v * 1.25 for k, v in ev.items()}
            return not self.fits_budget(self.budgeted(self.peaks(fit, micro, worse)))

        while bs not in self.eval_runs[precision] and eval_could_break(ev):
            self.eval_probe(precision, bs)
            ev = self.eval_inc(precision, bs)
            if bs == 1 or self.fits_budget(self.budgeted(self.peaks(fit, micro, ev))):
                break
            bs = max(1, bs // 2)
            ev = self.eval_inc(precision, bs)
        if not self.fits_budget(self.budgeted(self.peaks(fit, micro, ev))):
            return None
        return fit, micro, bs, ev

    def usable(self, precision: str) -> bool:
        """Whether ``precision`` can run here (CPU bf16 autocast is tried in a child process first)."""
        if precision == "fp32" or self.prober.device.type != "cpu":
            return True
        ok = autocast_works(self.prober.device.type, precision)
        note = f"{precision} autocast crashed a test process on this CPU; not used"
        if not ok and note not in self.decisions:
            self.decisions.append(note)
        return ok

    def plan(self, precisions: list[str], rates: list[float | None]) -> Plan:
        """Choose micro-batch, then r, then precision; raise :class:`BudgetError` when nothing fits.

        Lower precisions are probed only when the ones before them cannot fit."""
        self.fit_for(precisions[0], rates[0])  # the configured setting first (warms the runtime up at m=1)
        if self.budget_mb is not None:
            # refuse early: the most frugal setting (highest r, micro-batch 1, eval batch 1) of each precision
            needs: list[tuple[float, str]] = []
            for p in precisions:
                if p != precisions[0] and not self.usable(p):
                    continue
                needs.append((self.minimum(p, rates[-1]), p))
                if needs[-1][0] <= self.budget_mb:
                    break
            need, prec = min(needs)
            if need > self.budget_mb:
                rate_txt = f"r {rates[-1]:g}, " if rates[-1] is not None else ""
                raise self.refuse(need, f"micro-batch 1, {rate_txt}{prec}, eval batch 1", len(precisions) > 1)
        chosen = None
        tried = []
        for precision in precisions:
            if precision != precisions[0] and not self.usable(precision):
                continue
            tried.append(precision)
            for rate in rates:
                chosen = self.choose(precision, rate)
                if chosen is not None:
                    break
            if chosen is not None:
                break
        if chosen is None:  # only when memory does not fall with r / precision as assumed
            need, how = min((self.minimum(p, r), f"micro-batch 1, r {r}, {p}") for p in tried for r in rates)
            raise self.refuse(need, how, len(precisions) > 1)
        return self._plan(chosen, precisions, rates)

    def _plan(
        self,
        chosen: tuple[_Fit, int, int, dict[str, float]],
        precisions: list[str],
        rates: list[float | None],
    ) -> Plan:
        fit, micro, bs, ev = chosen
        batch = self.batch
        if fit.precision != precisions[0]:
            self.decisions.append(
                f"{fit.precision} autocast: {precisions[0]} did not fit even at micro-batch 1, r {rates[-1]}"
            )
        if fit.rate is not None and fit.rate != rates[0]:
            self.decisions.append(
                f"reduction rate raised {rates[0]:g} -> {fit.rate:g}: micro-batch 1 did not fit"
            )
        if micro < batch:
            full = self.budgeted(self.peaks(fit, batch, ev))
            self.decisions.append(
                f"micro-batch {micro} x {math.ceil(batch / micro)} steps: the whole batch {batch} would "
                f"peak at {full:.0f} MB (+{self.headroom(full):.0f} MB headroom)"
            )
        if bs < self.eval_bs:
            self.decisions.append(f"eval batch lowered {self.eval_bs} -> {bs} (evaluation, phase-2 caching)")
        peaks = self.peaks(fit, micro, ev)
        predicted = self.budgeted(peaks)
        verified = None
        if self.verify and micro in fit.probed:
            verified = self.budgeted(self.peaks(fit, micro, ev, measured=fit.probed[micro]))
        ev_peaks = {}
        for meter in self.meters:
            dev = self.on_device(meter)
            inc = (ev[meter] + self.cache_mb * dev) * (self.factor if meter == "rss" else 1.0)
            ev_peaks[meter] = self.idle[meter] + self.opt_mb * dev + inc + self.input_mb * dev
        backbone = self.method.backbone
        weights = sum(t.numel() * t.element_size() for t in [*backbone.parameters(), *backbone.buffers()])
        return Plan(
            method=self.method.name,
            device=str(self.prober.device),
            memory_scope=self.scope,
            budget_mb=self.budget_mb,
            batch_size=batch,
            micro_batch_size=micro,
            accumulation_steps=math.ceil(batch / micro),
            reduction_rate=fit.rate,
            precision=fit.precision,
            eval_batch_size=bs,
            idle_baseline_mb=self.prober.idle_rss,
            predicted_peak_mb=predicted,
            headroom_mb=self.headroom(predicted),
            minimum_budget_mb=float(math.ceil(self.minimum(fit.precision, fit.rate))),
            weights_mb=weights / MIB,
            trainable_mb=self.prober.trainable_bytes / MIB,
            gradients_mb=self.grad_mb,
            optimizer_mb=self.opt_mb,
            activations_mb=fit.saved(self.act_meter, micro),
            activations_per_sample_mb=fit.saved_slope[self.act_meter],
            overhead_mb=fit.overhead[self.act_meter],
            eval_peak_mb=self.budgeted(ev_peaks),
            input_mb=self.input_mb,
            predicted_peak_rss_mb=peaks["rss"],
            predicted_peak_cuda_mb=peaks.get("cuda"),
            idle_cuda_mb=self.prober.idle_cuda if self.cuda else None,
            verified_peak_mb=verified,
            linearity_error=fit.linearity_error,
            allocator=allocator_description(),
            probes=self.probes,
            candidates=self.candidates,
            decisions=self.decisions,
            idle_file_backed_mb=self.prober.idle_file_mb,
        )
