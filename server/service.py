"""Requests about new text: feature activations, the top features, steering. Synchronous
functions, never run on the event loop: activations and top features run in the threadpool
and get their forward pass from the model worker, batched with concurrent requests
(`ModelQueue.activations`); steering runs alone on the worker thread (server/worker.py)."""

from __future__ import annotations

from typing import Any

import torch

from activations.text import special_ids
from server.deps import AppState, ServedDictionary
from server.errors import ApiError
from server.inference import token_strings, tokenize
from server.limits import check_body
from server.schemas import (
    ActivationsRequest,
    ActivationsResponse,
    AppliedIntervention,
    Completion,
    FeatureTrace,
    OverallFeature,
    SteerRequest,
    SteerResponse,
    TokenFeature,
    TopFeaturesRequest,
    TopFeaturesResponse,
    UnitSource,
)
from server.steering import Steer, generate, prompt_norm_unit, steering_hooks


def _one_model(state: AppState, dictionaries: list[ServedDictionary]) -> Any:
    keys = {sd.model_key for sd in dictionaries}
    if len(keys) > 1:
        raise ApiError(
            422,
            "validation_error",
            f"the features belong to dictionaries of different models ({', '.join(sorted(keys))})",
        )
    return state.models[keys.pop()]


@torch.no_grad()
def activations(state: AppState, req: ActivationsRequest) -> ActivationsResponse:
    """Each requested feature's activation on every token of the text."""
    check_body(state.settings, req)
    resolved = [state.resolve(a) for a in req.features]
    model = _one_model(state, [sd for sd, _ in resolved])
    s = state.settings
    ids = tokenize(model, req.text, s.max_prompt_tokens, s.prepend_bos)
    xs: dict[str, torch.Tensor] = {}  # one forward pass per hook, one encode per dictionary
    acts: dict[str, torch.Tensor] = {}
    traces = []
    for sd, fid in resolved:
        d = sd.dictionary
        hook = d.cfg.hook_name or ""
        if hook not in xs:
            xs[hook] = state.queue.activations(model, hook, ids)
        if sd.name not in acts:
            acts[sd.name] = d.encode(xs[hook].to(d.device, d.dtype)).float().cpu()
        values = acts[sd.name][:, fid]
        traces.append(
            FeatureTrace(
                address=f"{sd.name}/{fid}", values=values.tolist(), max_value=float(values.max())
            )
        )
    return ActivationsResponse(
        tokens=token_strings(model, ids.tolist()), token_ids=ids.tolist(), features=traces
    )


@torch.no_grad()
def top_features(state: AppState, req: TopFeaturesRequest) -> TopFeaturesResponse:
    """The strongest features of each token, and over the whole text."""
    sd = state.get(req.dictionary)
    check_body(state.settings, req)
    s = state.settings
    model = state.model_for(sd)
    d = sd.dictionary
    ids = tokenize(model, req.text, s.max_prompt_tokens, s.prepend_bos)
    x = state.queue.activations(model, d.cfg.hook_name or "", ids)
    f = d.encode(x.to(d.device, d.dtype)).float().cpu()  # [T, F]
    k = min(req.k, f.shape[1])
    top = f.topk(k, dim=-1)
    per_token = [
        [
            TokenFeature(feature_id=int(i), value=float(v))
            for v, i in zip(vals, idx, strict=True)
            if v > 0
        ]
        for vals, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
    fmax = f.max(dim=0).values
    n_active = int((fmax > 0).sum())
    best = fmax.topk(min(req.limit, n_active)).indices.tolist() if n_active else []
    fsum, fcount = f.sum(dim=0), (f > 0).sum(dim=0)
    overall = []
    for i in best:
        labels = sd.store.labels(i) if sd.store is not None else []
        overall.append(
            OverallFeature(
                address=f"{sd.name}/{i}",
                feature_id=i,
                max_value=float(fmax[i]),
                sum_value=float(fsum[i]),
                count=int(fcount[i]),
                label=labels[-1].text if labels else None,
            )
        )
    return TopFeaturesResponse(
        dictionary=sd.name,
        tokens=token_strings(model, ids.tolist()),
        token_ids=ids.tolist(),
        per_token=per_token,
        overall=overall,
    )


def _max_act(sd: ServedDictionary, fid: int) -> float:
    assert sd.store is not None
    return sd.store.feature(fid).max_act


@torch.no_grad()
def steer(state: AppState, req: SteerRequest) -> SteerResponse:
    """Baseline and steered continuations of the prompt, same decoding and seed."""
    check_body(state.settings, req)
    s = state.settings
    resolved = [state.resolve(iv.feature) for iv in req.interventions]
    model = _one_model(state, [sd for sd, _ in resolved])
    prompt = tokenize(model, req.prompt, s.max_prompt_tokens, s.prepend_bos)
    steers, applied = [], []
    source: UnitSource
    for iv, (sd, fid) in zip(req.interventions, resolved, strict=True):
        unit: float | None = None
        if iv.mode == "clamp":
            source = "raw"
        elif sd.has_analysis() and (max_act := _max_act(sd, fid)) > 0:
            unit, source = max_act, "analysis_max_activation"
        else:  # no analysis, or the feature never fired in it (a unit of 0 would do nothing)
            unit, source = prompt_norm_unit(model, prompt, sd.dictionary, fid), "prompt_norm"
        steers.append(
            Steer(sd.dictionary, fid, iv.mode, iv.strength, 1.0 if unit is None else unit)
        )
        applied.append(
            AppliedIntervention(
                address=f"{sd.name}/{fid}",
                mode=iv.mode,
                strength=iv.strength,
                unit=unit,
                unit_source=source,
            )
        )
    _bos, eos = special_ids(model.tokenizer)

    def run(hooks: list[Any]) -> list[int]:  # the same decoding and seed for both
        return generate(
            model, prompt, hooks, req.max_new_tokens, req.temperature, req.top_k, req.seed, (eos,)
        )

    baseline, steered = run([]), run(steering_hooks(steers))

    def completion(ids: list[int]) -> Completion:
        return Completion(
            text=model.tokenizer.decode(ids), tokens=token_strings(model, ids), token_ids=ids
        )

    return SteerResponse(
        prompt_tokens=token_strings(model, prompt.tolist()),
        baseline=completion(baseline),
        steered=completion(steered),
        interventions=applied,
        seed=req.seed,
    )
