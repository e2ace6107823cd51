r"""The one reader and the one scorer of a program.

Every algorithm (and :mod:`pyro_lm.exact`) runs a model the same way: ``N``
executions at once, inside an outer particle plate left of the model's own plates
(like Pyro's ``vectorize_particles``), each LM site decoded by one batched call
with the prompts *of that execution* (a prompt built from another choice is read
from that choice's value, never from a placeholder run). A guide, if any, runs
first and the model replays it.

The scorer then gives each execution its log-weight

.. math::

    \log w = \sum_{s \in \text{model}} \sigma_s \log p(s)
           - \sum_{s \in \text{proposed}} \log \pi(s),

where :math:`\sigma_s` is the site's scale and mask (``poutine.scale``,
``poutine.mask``), the first sum runs over every sample site of the model (latent
sites, LM sites, factors and observed data) and the second over the latent sites
the proposal drew (the guide's sites with their *unscaled* density, the density
they were drawn from; sites the model drew itself cancel with their prior and cost
nothing when unscaled). The one plate rule (:mod:`pyro_lm.ops.plates`): the weight
keeps the plate dims that every scored site shares (independent problems, e.g.
prompts) and sums all others, so a site outside a plate (a global latent, a factor
over the whole batch) gives that plate one joint weight per sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape

from pyro_lm.distributions.lm_distribution import unwrap_lm
from pyro_lm.ops.plates import aligned, check_plated, sum_to_batch
from pyro_lm.poutine import DecodeLMMessenger, SkipLMMessenger, decoded_log_prob

__all__ = ["PARTICLES", "Execution", "execute", "plate_nesting", "trace_nesting",
           "check_whole_plates", "is_scaled", "structure_trace",
           "lm_site_names",
           "check_vectorized_sites", "raise_vectorized",
           "latent_site_names", "scored_sites", "single_lm_site", "vectorize"]

#: Name of the outer plate that holds the ``N`` executions.
PARTICLES = "_pyro_lm_particles"

_SCALAR_ERRORS = ("only one element tensors can be converted", "cannot be converted to Scalar",
                  "Boolean value of Tensor with more than one", "is ambiguous")


def lm_site_names(trace) -> list[str]:
    """Names of the unobserved :class:`~pyro_lm.LMDistribution` sample sites of ``trace``."""
    return [name for name, site in trace.nodes.items() if site["type"] == "sample"
            and not site["is_observed"] and unwrap_lm(site["fn"]) is not None]


def latent_site_names(trace) -> list[str]:
    """Names of the unobserved sample sites of ``trace`` (LM or not; no subsample sites)."""
    return [name for name, site in trace.nodes.items() if site["type"] == "sample"
            and not site["is_observed"] and not site_is_subsample(site)]


def scored_sites(trace) -> list[tuple[str, dict]]:
    """``(name, site)`` of every sample site that enters a weight: all but subsample sites
    and ``pyro.deterministic`` records."""
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample"
            and not site_is_subsample(site) and not site["infer"].get("_deterministic")]


def vectorize(fn, num: int, dim: int):
    """``fn`` run inside the particle plate of size ``num`` at ``dim``."""

    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLES, num, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _plate_dims(site) -> frozenset:
    return frozenset(f.dim for f in site["cond_indep_stack"]
                     if f.vectorized and f.name != PARTICLES)


def structure_trace(model, guide=None, args=(), kwargs=None):
    """``(model_trace, guide_trace)``: the model (replaying the guide, if any) traced with
    placeholder LM values (:class:`~pyro_lm.poutine.SkipLMMessenger`): plates and names only,
    never prompts or factors."""
    kwargs = kwargs or {}
    try:
        with poutine.block():
            guide_trace = None if guide is None else poutine.trace(
                SkipLMMessenger()(guide)).get_trace(*args, **kwargs)
            run = SkipLMMessenger()(model)
            if guide_trace is not None:
                run = poutine.replay(run, trace=guide_trace)
            return poutine.trace(run).get_trace(*args, **kwargs), guide_trace
    except ZeroDivisionError as e:  # pyro.plate of size 0
        raise ValueError(f"prompts: the model built an empty plate ({e}); pass at least one "
                         "prompt (was the list of prompts empty?)") from e


def plate_nesting(model, guide=None, args=(), kwargs=None) -> int:
    """The deepest vectorised plate dim of ``model`` (and ``guide``), read from one run in
    which LM sites hold placeholders (structure only)."""
    return trace_nesting(*structure_trace(model, guide, args, kwargs or {}))


def trace_nesting(*traces) -> int:
    """The deepest vectorised plate dim of the sample sites of ``traces`` (``None`` skipped)."""
    return max([0] + [-f.dim for trace in traces if trace is not None
                      for site in trace.nodes.values() if site["type"] == "sample"
                      for f in site["cond_indep_stack"] if f.vectorized])


def check_whole_plates(owner: str, *traces) -> None:
    """Refuse a sample site of ``traces`` (``None`` skipped) that is in a subsampled plate.

    :raises ValueError: naming ``owner``, a sampler, which weighs whole plates.
    """
    for trace in traces:
        for site in ([] if trace is None else trace.nodes.values()):
            if site["type"] == "sample" and any(
                    f.full_size is not None and f.full_size != f.size
                    for f in site["cond_indep_stack"]):
                raise ValueError(
                    f"model: site {site['name']!r} is in a subsampled plate; {owner} weighs "
                    "whole plates (a subsample's scaled density is no density of its prompts). "
                    "Drop subsample_size for sampling, or subsample in SVI")


def raise_vectorized(e: Exception, num: int, dim: int):
    """Re-raise ``e``, explained, if it is Python control flow failing on a vectorised
    latent value (``int(z)``, ``if z``); else as it is."""
    mismatch = re.search(rf"Shape mismatch inside plate\('{PARTICLES}'\) at site (.+) dim "
                         r"(-?\d+), (\d+) vs (\d+)", str(e))
    if mismatch:
        site, _, size, got = mismatch.groups()
        raise ValueError(
            f"site {site!r}: its value or log-density does not fit the {num} executions the "
            f"program is run as at once (a plate of size {size} at dim {dim}, left of its own "
            f"plates): its shape has {got} there. A factor gives one value per execution and "
            "plate element; one value per token ((..., T)) must be summed over its last dim "
            f"first, e.g. pyro.factor({site!r}, per_token.sum(-1))") from e
    if any(text in str(e) for text in _SCALAR_ERRORS):
        raise ValueError(
            f"model: it is run vectorised, {num} executions at once in a plate at dim {dim} "
            "(left of its own plates), so every latent value has that leading dim and Python "
            "control flow on it (int(z), if z: ..., prompts[int(z)]) fails. Write it with "
            "tensor ops: index token ids with the tensor (prompt_ids[z], with "
            "LMDistribution(lm, prompt_ids[z], T)), and torch.where for branches") from e
    raise e


@dataclass
class Execution:
    r"""``num`` vectorised executions of a model, proposed by a guide, the prior or a fixer.

    :ivar model_trace: the model's trace, every site inside the particle plate.
    :ivar guide_trace: the guide's trace, or ``None`` (the model drew its own latents).
    :ivar int num: executions ``N`` (the particle dim, at ``-(nesting + 1)``).
    :ivar int nesting: the model's plate nesting ``n``.
    :ivar bool fixed: latent values were set from outside (e.g. enumerated): every latent
        site's :math:`\log p` is scored and nothing is proposed.
    """

    model_trace: object
    guide_trace: object
    num: int
    nesting: int
    fixed: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------------- reading
    def samples(self) -> dict:
        """Latent site → value with the leading particle dim ``N``."""
        return {name: self._expand(self.model_trace.nodes[name]["value"], name)
                for name in latent_site_names(self.model_trace)}

    def _expand(self, value, name):
        site = self.model_trace.nodes[name]
        event = len(site["fn"].event_shape)
        shape = value.shape[: value.dim() - event]
        lead = self.nesting + 1 - len(shape)
        value = value.reshape((1,) * max(lead, 0) + tuple(value.shape))
        return value.expand((self.num,) + tuple(value.shape[1:]))

    def lms(self) -> dict:
        """LM site → its (prior) :class:`~pyro_lm.CausalLM`, to decode."""
        return {name: unwrap_lm(self.model_trace.nodes[name]["fn"]).lm
                for name in lm_site_names(self.model_trace)}

    @property
    def batch_shape(self) -> torch.Size:
        """The weights' batch shape: sizes of the plate dims every scored site shares, 1 for
        the others, aligned to the model's ``n`` plate dims."""
        if "batch" not in self._cache:
            sites = scored_sites(self.model_trace)
            if self.guide_trace is not None:
                sites += scored_sites(self.guide_trace)
            sizes = {}
            for _, site in sites:
                for f in site["cond_indep_stack"]:
                    if f.vectorized and f.name != PARTICLES:
                        sizes[f.dim] = f.size
            common = frozenset.intersection(*[_plate_dims(s) for _, s in sites]) if sites \
                else frozenset()
            self._cache["batch"] = torch.Size(sizes[d] if d in common else 1
                                              for d in range(-self.nesting, 0))
        return self._cache["batch"]

    # -------------------------------------------------------------------- scoring
    def to_batch(self, log_prob, name: str = "site") -> torch.Tensor:
        """A site's log-density summed to the weights' plates (:attr:`batch_shape`)."""
        return sum_to_batch(log_prob, self.batch_shape, name)

    def _check_shape(self, site):
        check_plated(site["fn"].batch_shape, _plate_dims(site), self.nesting, site["name"])
        try:
            check_site_shape(site, self.nesting + 1)
        except ValueError as e:
            raise ValueError(
                f"{e}\nThe program runs vectorised over {self.num} executions in a plate at "
                f"dim {-(self.nesting + 1)}: a site outside the model's plates must keep that "
                "dim, e.g. pyro.factor('r', reward(x).sum(-1, keepdim=True))") from None

    def site_log_prob(self, name: str, which: str = "model", scaled: bool = True):
        """A site's log-density ``(N or 1, *batch_shape)``: scaled and masked for the model,
        unscaled for the guide (the density it was drawn from); the decoding
        log-probability where the site was decoded from that very distribution."""
        trace = self.model_trace if which == "model" else self.guide_trace
        site = trace.nodes[name]
        key = (name, which, scaled and is_scaled(site))
        if key not in self._cache:
            log_prob = decoded_log_prob(site)
            if log_prob is None or (which == "model" and self.guide_trace is not None
                                    and name in self.guide_trace.nodes):
                log_prob = site["fn"].log_prob(site["value"])
            if scaled:
                log_prob = scale_and_mask(log_prob, site["scale"], site["mask"])
            self._check_shape(dict(site, log_prob=aligned(log_prob, self.nesting, name)))
            self._cache[key] = self.to_batch(log_prob, name)
        return self._cache[key]

    def _proposed(self) -> set:
        if self.guide_trace is None:
            return set()
        return set(latent_site_names(self.guide_trace))

    def log_factors(self) -> torch.Tensor:
        r""":math:`\sum \sigma_s \log p(s)` over the model's observed sites (factors, data),
        ``(N, *batch)``."""
        if "log_factors" not in self._cache:
            total = None
            for name, site in scored_sites(self.model_trace):
                if site["is_observed"]:
                    term = self.site_log_prob(name)
                    total = term if total is None else total + term
            self._cache["log_factors"] = self._full(total)
        return self._cache["log_factors"]

    def log_joint(self) -> torch.Tensor:
        r""":math:`\sum \sigma_s \log p(s)` over the model's scored sites, except latent sites
        that the model drew itself unscaled (they cancel with their proposal), ``(N, *batch)``."""
        if "log_joint" not in self._cache:
            proposed, total = self._proposed(), self.log_factors()
            for name, site in scored_sites(self.model_trace):
                if site["is_observed"]:
                    continue
                if not (self.fixed or name in proposed):
                    if not is_scaled(site):
                        continue  # drawn from its own prior: cancels exactly
                    term = self.site_log_prob(name) - self.site_log_prob(name, scaled=False)
                else:
                    term = self.site_log_prob(name)
                total = total + term
            self._cache["log_joint"] = self._full(total)
        return self._cache["log_joint"]

    def log_proposal(self) -> torch.Tensor:
        r""":math:`\sum \log \pi(s)` over the sites the guide drew (unscaled), ``(N, *batch)``."""
        if "log_proposal" not in self._cache:
            total = None
            for name in self._proposed():
                if name not in self.model_trace.nodes and not \
                        self.guide_trace.nodes[name]["infer"].get("is_auxiliary"):
                    raise ValueError(f"guide: it samples {name!r}, which the model does not "
                                     "have; a guide draws only the model's latent sites (or "
                                     "auxiliary ones, marked infer={'is_auxiliary': True})")
                term = self.site_log_prob(name, "guide", scaled=False)
                total = term if total is None else total + term
            self._cache["log_proposal"] = self._full(total)
        return self._cache["log_proposal"]

    def log_weights(self) -> torch.Tensor:
        r""":math:`\log w` ``(N, *batch)``: :meth:`log_joint` less :meth:`log_proposal`."""
        return self.log_joint() - self.log_proposal()

    def _full(self, total) -> torch.Tensor:
        shape = (self.num,) + tuple(self.batch_shape)
        if total is None:
            return torch.zeros(shape, device=self._device())
        return torch.as_tensor(total, dtype=torch.float32).expand(shape)

    def _device(self):
        for _, site in scored_sites(self.model_trace):
            if isinstance(site["value"], torch.Tensor):
                return site["value"].device
        return torch.device("cpu")


def check_vectorized_sites(trace, nesting: int) -> None:
    """Refuse a site whose batch has a dim of size > 1 that none of its plates declares
    (:func:`~pyro_lm.ops.plates.check_plated`), in a trace with ``nesting`` model plates and
    particle plates left of them."""
    for _, site in scored_sites(trace):
        dims = frozenset(f.dim for f in site["cond_indep_stack"]
                         if f.vectorized and -f.dim <= nesting)
        check_plated(site["fn"].batch_shape, dims, nesting, site["name"])


def is_scaled(site) -> bool:
    """Whether a site (or message) carries a scale other than 1 or a mask."""
    scale = site["scale"]
    return site["mask"] is not None or isinstance(scale, torch.Tensor) or scale != 1.0


def execute(model, guide=None, num: int = 1, args=(), kwargs=None, nesting: int | None = None,
            owner: str = "model", assign=None) -> Execution:
    """Run ``model`` ``num`` times at once, its latent sites proposed by ``guide`` (or drawn
    from the model itself), every LM site decoded in one batched call; no gradient.

    :param str owner: the algorithm, for error messages.
    :param assign: instead of a guide, a messenger that sets every latent site's value
        (e.g. exact enumeration); every latent site is then scored (``fixed``).
    :raises ValueError: for subsample plates (a sampler weighs whole plates), or Python
        control flow on latent values (the program must run vectorised).
    """
    kwargs = kwargs or {}
    if nesting is None:
        nesting = plate_nesting(model, guide, args, kwargs)
    dim = -(nesting + 1)
    try:
        with torch.no_grad(), poutine.block():
            guide_trace = None
            run = vectorize(model, num, dim)
            if assign is not None:
                run = assign(run)
            elif guide is not None:
                guide_trace = poutine.trace(DecodeLMMessenger()(vectorize(guide, num, dim))
                                            ).get_trace(*args, **kwargs)
                run = poutine.replay(run, trace=guide_trace)
            model_trace = poutine.trace(DecodeLMMessenger()(run)).get_trace(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise_vectorized(e, num, dim)
    check_whole_plates(owner, model_trace, guide_trace)
    return Execution(model_trace, guide_trace, num, nesting, fixed=assign is not None)


def single_lm_site(model, args=(), kwargs=None, owner: str = "model", trace=None):
    """The one :class:`~pyro_lm.LMDistribution` site of a program with no other latent site,
    read from one run without decoding (its prompt cannot depend on a random choice, since
    there is none).

    :param trace: the program's :func:`structure_trace` if the caller has it (else run).
    :returns: ``(name, dist, batch_shape)``: the site's (plate-expanded) distribution and
        the shape, less the particle and token dims, of the values
        :class:`~pyro_lm.poutine.LogFactorsMessenger` takes (1 for plates it is not in).
    :raises ValueError: naming ``owner``, unless the model has exactly one plain, unscaled
        LM site, no other latent site, no subsampled plate, and every factor in the LM
        site's plates.
    """
    if trace is None:
        trace, _ = structure_trace(model, None, args, kwargs or {})
    names = lm_site_names(trace)
    if len(names) != 1:
        raise ValueError(f"model: {owner} drives exactly one LM site, the model has {names}; "
                         "condition the others (pyro.condition) or use Importance")
    name = names[0]
    latent = [n for n in latent_site_names(trace) if n != name]
    if latent:
        raise ValueError(f"model: latent sites {latent} besides the LM site {name!r}; "
                         f"{owner} infers one LM site (condition the others, or use "
                         "Importance)")
    check_whole_plates(owner, trace)
    site = trace.nodes[name]
    fn = site["fn"]
    if unwrap_lm(fn) is not fn or is_scaled(site):
        raise ValueError(f"model: site {name!r} is scaled, masked or wraps its LMDistribution "
                         f"(poutine.scale / mask, .mask, .to_event); {owner} needs the plain, "
                         "unscaled LM site: scale the factors instead, or use Importance")
    nesting = trace_nesting(trace)
    batch = torch.Size((1,) * (nesting - len(fn.batch_shape)) + tuple(fn.batch_shape))
    return name, fn, batch
