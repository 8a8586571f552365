"""``DifferADGRPOTrainer``: TRL's ``GRPOTrainer`` with difficulty weights and group resampling.

The algorithms live in the core (:func:`differad_rl.groups.difficulty_weights`,
:func:`differad_rl.groups.degenerate_groups`, :func:`differad_rl.resampling.resample_groups`); this
module only wires them into TRL 1.16's generation step:

1. ``super()._generate_and_score_completions`` generates and scores the local batch; the overridden
   ``_calculate_rewards`` keeps the per-function rewards, gathered over all processes (N × F, N = global
   batch, groups of G = ``num_generations`` contiguous rows).
2. Resampling (``resample_rounds`` = K > 0): the driver judges degeneracy on the gathered localization
   reward — identical on every rank, so every rank regenerates the same global groups in the same
   rounds and every collective is entered by every rank. ``regenerate`` calls ``super()`` again on this
   rank's rows of those groups (padded with filler rows to one common size per rank, so TRL's gathers
   line up), splices the new rows into the batch (prompt tensors re-padded on the left, completion
   tensors on the right, pixel values split by ``image_grid_thw``) and the new rewards into the
   gathered reward matrix. Afterwards the advantages are recomputed from the spliced rewards with TRL's
   own ``scale_rewards`` / ``multi_objective_aggregation`` semantics (:func:`trl_advantages`) and
   ``num_items_in_batch`` is recounted.
3. Weights (``difficulty_weighting``): Â_i = ω_g · A_i, with ω from the gathered localization reward.

4. The peers' strategies (DESIGN §9), opt-in: ``degeneracy_rule="emit"`` changes the groups step 2
   regenerates; ``advantage_weighting="emit"|"univg"`` and ``group_filter="dapo"|"easyr1"`` are applied
   last by :func:`~differad_rl.integrations.trl.peers.apply_peer_strategies`.

With every feature off the trainer returns ``super()``'s output untouched: it is plain GRPOTrainer.
Only the training batch is changed; evaluation batches are TRL's.

5. Protocol metrics (:mod:`.evaluation`): with an eval dataset of pair rows, every evaluation also logs
   greedy held-out ``eval_differad/miou``, ``acc@0.3``, ``f1@0.3``, … beside TRL's own eval metrics.

Logged per step (``train/differad/...``): ``weight_mean``, ``weight_max``, ``degenerate_before``,
``degenerate_after`` (shares of groups), ``groups_resampled`` (distinct groups), ``regenerations``
(group regenerations over all rounds), ``rounds_used``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from differad_rl.groups import degenerate_groups, difficulty_weights
from differad_rl.group_filters import regenerate_groups

from .compat import KNOWN_OUTPUT_KEYS, UnsupportedOutputError, check_output_keys, check_trl_version
from .config import DifferADGRPOConfig
from .evaluation import ProtocolEvaluation
from .peers import apply_peer_strategies, peers_active, resample_rule

__all__ = ["DifferADGRPOTrainer", "check_dataset_columns", "splice_rows", "trl_advantages"]

check_trl_version()

_METRIC_PREFIX = "differad/"


def trl_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's advantages from the gathered per-function rewards (a copy of its inline code).

    ``sum_then_normalize``: r = Σ_k w_k r_k (NaN-aware; NaN where every function is NaN),
    A = (r − mean_g) / (std + 1e-4) with std per group (``scale_rewards="group"``), over the batch
    (``"batch"``) or A = r − mean_g (``"none"``); std is Bessel-corrected and NaN-aware.
    ``normalize_then_sum``: each function normalised per group, weighted sum, then normalised over the batch.
    NaN advantages (unscorable rows) become 0.

    Args:
        rewards_per_func: (N, F) gathered rewards, groups of ``num_generations`` contiguous rows.
        reward_weights: (F,) weights.
    Returns:
        ``(advantages (N,), is_std_zero (N,) bool)`` — the second as TRL logs ``frac_reward_zero_std``.
    """
    g = num_generations
    weights = reward_weights.to(rewards_per_func.device).unsqueeze(0)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
        if scale_rewards in ("group", "none"):
            if g > 1:
                std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
            else:
                std = torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, g, rewards_per_func.size(1))
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if g > 1 else torch.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.size(1))
        rewards = (reward_k * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    else:
        raise ValueError(
            "multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', "
            f"got {multi_objective_aggregation!r}"
        )
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def _pad_to(t: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    """Pad ``t`` (B, W, ...) along dim 1 to ``width`` with ``value`` on the left or right."""
    extra = width - t.size(1)
    if extra <= 0:
        return t
    filler = t.new_full((t.size(0), extra, *t.shape[2:]), value)
    return torch.cat([filler, t] if left else [t, filler], dim=1)


def _row_sections(grid_thw: torch.Tensor, num_images: Sequence[int]) -> list[int]:
    """Rows of ``pixel_values`` per sample: Σ over the sample's images of t·h·w."""
    per_image = grid_thw.prod(-1)
    bounds = torch.tensor([0, *num_images], device=per_image.device).cumsum(0)
    cum = torch.cat([per_image.new_zeros(1), per_image.cumsum(0)])
    return (cum[bounds[1:]] - cum[bounds[:-1]]).tolist()


def splice_rows(
    dst: dict[str, Any], src: dict[str, Any], dst_rows: torch.Tensor, pad_token_id: int
) -> dict[str, Any]:
    """Return ``dst`` with rows ``dst_rows`` replaced by the first ``len(dst_rows)`` rows of ``src``.

    Both are outputs of ``GRPOTrainer._generate_and_score_completions``. Prompt tensors are left-padded
    and completion tensors right-padded to the larger of the two widths (so a spliced row's tokens,
    masks and log-probs are the ones of its own sub-batch, just with more padding); ``(B, P + C)``
    token-type tensors are split at P and re-padded the same way; pixel values are split per sample
    by ``image_grid_thw`` / ``num_images`` and reassembled. ``num_items_in_batch`` is copied from
    ``dst`` and must be recomputed by the caller (it is a global count). Unknown keys raise.
    """
    check_output_keys(dst)
    check_output_keys(src)
    if set(dst) != set(src):
        raise ValueError(f"cannot splice outputs with different keys: {sorted(set(dst) ^ set(src))}")
    n = int(dst_rows.numel())
    rows = dst_rows.to(dst["prompt_ids"].device)
    p_dst, p_src = dst["prompt_ids"].size(1), src["prompt_ids"].size(1)
    c_dst, c_src = dst["completion_ids"].size(1), src["completion_ids"].size(1)
    p_width, c_width = max(p_dst, p_src), max(c_dst, c_src)
    pad_values = {"prompt_ids": pad_token_id, "completion_ids": pad_token_id, "tool_mask": 1}
    out: dict[str, Any] = {}
    for key, value in dst.items():
        layout = KNOWN_OUTPUT_KEYS[key]
        other = src[key]
        if layout in ("left", "right"):
            left = layout == "left"
            fill = pad_values.get(key, 0)
            width = p_width if left else c_width
            value, other = _pad_to(value, width, fill, left), _pad_to(other, width, fill, left)
            merged = value.clone()
            merged[rows] = other[:n].to(merged.dtype)
            out[key] = merged
        elif layout == "prompt_completion":
            parts = []
            for t, p in ((value, p_dst), (other, p_src)):
                prompt_part = _pad_to(t[:, :p], p_width, 0, left=True)
                parts.append(torch.cat([prompt_part, t.new_zeros(t.size(0), c_width)], dim=1))
            merged = parts[0].clone()
            merged[rows] = parts[1][:n]
            out[key] = merged
        elif layout == "row":
            merged = value.clone()
            merged[rows] = other[:n].to(merged.dtype)
            out[key] = merged
        elif layout == "recompute":
            out[key] = value
    if "pixel_values" in dst:
        if "image_grid_thw" not in dst or "num_images" not in dst:
            raise UnsupportedOutputError(
                "group resampling splices pixel values by image_grid_thw (Qwen-VL); this batch has "
                f"keys {sorted(dst)}"
            )
        pv_dst = list(torch.split(dst["pixel_values"], _row_sections(dst["image_grid_thw"], dst["num_images"])))
        pv_src = list(torch.split(src["pixel_values"], _row_sections(src["image_grid_thw"], src["num_images"])))
        grid_dst = list(torch.split(dst["image_grid_thw"], list(dst["num_images"])))
        grid_src = list(torch.split(src["image_grid_thw"], list(src["num_images"])))
        num_images = list(dst["num_images"])
        for j, r in enumerate(rows.tolist()):  # list bookkeeping, one entry per spliced row
            pv_dst[r], grid_dst[r], num_images[r] = pv_src[j], grid_src[j], src["num_images"][j]
        out["pixel_values"] = torch.cat(pv_dst, dim=0)
        out["image_grid_thw"] = torch.cat(grid_dst, dim=0)
        out["num_images"] = num_images
    elif "num_images" in dst:
        num_images = list(dst["num_images"])
        for j, r in enumerate(rows.tolist()):
            num_images[r] = src["num_images"][j]
        out["num_images"] = num_images
    return out


class DifferADGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with DifferAD-R1's difficulty weights (§5) and group resampling (§6).

    Same constructor as ``GRPOTrainer``; pass a :class:`DifferADGRPOConfig` as ``args`` (a plain
    ``GRPOConfig`` means both features off). The localization reward is the reward function named by
    ``args.localization_reward`` (its ``__name__``); an unknown name raises ``ValueError`` listing the
    known ones. Group resampling needs TRL's own transformers generation: it is refused with vLLM,
    ``rollout_func``, tools or environments (they generate per prompt or per turn, not per row).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_before_build(*args, **kwargs)  # before TRL builds a vLLM engine or waits for a server
        super().__init__(*args, **kwargs)
        cfg = self.args
        self._dw_on = bool(getattr(cfg, "difficulty_weighting", False))
        self._resample_k = int(getattr(cfg, "resample_rounds", 0))
        self._dw_tau = float(getattr(cfg, "difficulty_tau", 0.3))
        self._dw_scope = str(getattr(cfg, "difficulty_scope", "group"))
        self._degenerate_tol = float(getattr(cfg, "degenerate_tol", 1e-6))
        self._last_rewards_per_func: torch.Tensor | None = None
        self._loc_index: int | None = None
        self._peers_on = peers_active(cfg)  # the peers' weightings / group filters (peers.py)
        self._resample_rule = resample_rule(cfg)
        loc_name = getattr(cfg, "localization_reward", None)
        if self._dw_on or self._resample_k > 0 or self._peers_on or loc_name is not None:  # a wrong name fails
            index = self._resolve_localization_reward(loc_name)
            self._loc_index = index if self._dw_on or self._resample_k > 0 or self._peers_on else None
        if self._resample_k > 0:
            blockers = {
                "use_vllm=True": bool(getattr(self, "use_vllm", False)),
                "rollout_func": getattr(self, "rollout_func", None) is not None,
                "tools": bool(getattr(self, "tools", None)),
                "environment_factory": getattr(self, "environment_factories", None) is not None,
            }
            used = [name for name, on in blockers.items() if on]
            if used:
                raise ValueError(_resample_blocked_message(self._resample_k, used))
        # protocol metrics on eval_dataset (evaluation.py): checked here, run by evaluate/evaluation_loop below
        self._protocol_eval = ProtocolEvaluation.from_trainer(self)

    def _resolve_localization_reward(self, name: str | None) -> int:
        known = list(self.reward_func_names)
        if name is None:
            if len(known) == 1:
                index = 0
            else:
                raise ValueError(
                    "localization_reward=None is ambiguous with several reward functions; set it to the name of "
                    f"the localization reward, one of {known}"
                )
        elif name not in known:
            raise ValueError(f"localization_reward={name!r} is not a reward function of this trainer; known: {known}")
        else:
            index = known.index(name)
        if known.count(known[index]) > 1:
            raise ValueError(
                f"localization_reward={known[index]!r}: {known.count(known[index])} reward functions have this name "
                f"({known}); TRL logs them under one key and the localization reward would silently be the first. "
                "Give each a distinct name, e.g. get_reward('dclr', processor, name='dclr_enclosing_reward')"
            )
        func = self.reward_funcs[index]
        if _is_text_only_reward(func):
            raise ValueError(
                f"localization_reward={known[index]!r} is the format reward, which judges the text, not the box: "
                "difficulty weights and degeneracy would be judged on it. Name a box reward (dclr_reward, "
                "iou_reward, consistency_reward, multi_box_reward); "
                "differad_rl.integrations.trl.localization_reward_name(names) picks it from a list of names"
            )
        return index

    # ------------------------------------------------------------------------------------------ hooks
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # noqa: D401 - TRL hook
        """TRL's reward computation; keeps the gathered (N, F) matrix for the DifferAD step."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        if mode != "train" or self._loc_index is None:
            return output
        rewards_per_func = self._last_rewards_per_func
        g = self.num_generations
        rank, local_n = self.accelerator.process_index, len(inputs)
        local = slice(rank * local_n, (rank + 1) * local_n)
        loc = torch.nan_to_num(rewards_per_func[:, self._loc_index], nan=0.0)
        metrics = self._metrics[mode]

        if self._resample_k > 0:
            output, rewards_per_func, loc = self._resample(inputs, output, rewards_per_func, loc, mode)
        else:
            share = degenerate_groups(loc, g, tol=self._degenerate_tol).float().mean().item()
            metrics[_METRIC_PREFIX + "degenerate_before"].append(share)
            metrics[_METRIC_PREFIX + "degenerate_after"].append(share)

        if self._dw_on:
            weights = difficulty_weights(loc, g, tau=self._dw_tau, scope=self._dw_scope)
            adv = output["advantages"]
            w_local = weights[local].to(device=adv.device, dtype=adv.dtype)
            output["advantages"] = adv * (w_local if adv.dim() == 1 else w_local.unsqueeze(-1))
            metrics[_METRIC_PREFIX + "weight_mean"].append(weights.float().mean().item())
            metrics[_METRIC_PREFIX + "weight_max"].append(weights.float().max().item())
            self._replace_logged_advantages(self._logged_advantages_global(weights))
        if self._peers_on:
            output = apply_peer_strategies(self, inputs, output, loc, mode)
        return output

    # ------------------------------------------------------------------------------------ resampling
    def _resample(
        self,
        inputs: list[dict[str, Any]],
        output: dict[str, Any],
        rewards_per_func: torch.Tensor,
        loc: torch.Tensor,
        mode: str,
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        g = self.num_generations
        rank, world, local_n = self.accelerator.process_index, self.accelerator.num_processes, len(inputs)
        check_output_keys(output)
        state = {"output": output, "rpf": rewards_per_func.clone(), "completions": {}}
        pad_id = self._tokenizer.pad_token_id

        def regenerate(groups: torch.Tensor, round_index: int) -> torch.Tensor:
            groups = groups.to(torch.long).cpu()
            offsets = torch.arange(g)
            rows_given = (groups.unsqueeze(1) * g + offsets).reshape(-1)
            rows = torch.sort(rows_given).values  # global rows, ascending
            owner = torch.div(rows, local_n, rounding_mode="floor")
            counts = torch.bincount(owner, minlength=world)  # rows per rank, known to every rank
            per_rank = int(counts.max().item())
            while (per_rank * world) % g:  # TRL views the gathered sub-batch as (-1, G)
                per_rank += 1
            mine = rows[owner == rank] - rank * local_n
            fill = [j % local_n for j in range(per_rank - mine.numel())]
            sub_inputs = [inputs[i] for i in mine.tolist()] + [inputs[i] for i in fill]
            sub_output, sub_rpf, sub_completions = self._generate_captured(sub_inputs, mode)
            # real rows of the gathered sub-batch, in ascending global order
            starts = torch.arange(world) * per_rank
            real = torch.cat([torch.arange(int(c)) + s for c, s in zip(counts.tolist(), starts.tolist())])
            state["rpf"][rows.to(state["rpf"].device)] = sub_rpf[real.to(sub_rpf.device)].to(state["rpf"].dtype)
            for r, j in zip(rows.tolist(), real.tolist()):
                state["completions"][r] = sub_completions[j] if sub_completions is not None else None
            if mine.numel():
                state["output"] = splice_rows(state["output"], sub_output, mine, pad_id)
            new_loc = state["rpf"][rows_given.to(state["rpf"].device), self._loc_index]
            return torch.nan_to_num(new_loc, nan=0.0)

        final_loc, stats = regenerate_groups(loc, g, regenerate, self._resample_k, self._resample_rule)
        metrics = self._metrics[mode]
        metrics[_METRIC_PREFIX + "degenerate_before"].append(float(stats.degenerate_before))
        metrics[_METRIC_PREFIX + "degenerate_after"].append(float(stats.degenerate_after))
        metrics[_METRIC_PREFIX + "groups_resampled"].append(float(stats.groups_resampled))
        metrics[_METRIC_PREFIX + "regenerations"].append(float(stats.regenerations))
        metrics[_METRIC_PREFIX + "rounds_used"].append(float(stats.rounds_used))
        if stats.regenerations == 0:
            return output, rewards_per_func, loc

        out = state["output"]
        rpf = state["rpf"]
        advantages, is_std_zero = trl_advantages(
            rpf, self.reward_weights, g, self.scale_rewards, self.multi_objective_aggregation
        )
        local = slice(rank * local_n, (rank + 1) * local_n)
        out["advantages"] = advantages[local].to(out["advantages"].device, out["advantages"].dtype)
        loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        self._relog_after_resampling(mode, rpf, advantages, is_std_zero, state["completions"])
        self._last_rewards_per_func = rpf
        return out, rpf, torch.nan_to_num(rpf[:, self._loc_index], nan=0.0).to(final_loc.dtype)

    def _generate_captured(
        self, sub_inputs: list[dict[str, Any]], mode: str
    ) -> tuple[dict[str, Any], torch.Tensor, list | None]:
        """Run ``super()._generate_and_score_completions`` on a sub-batch without touching the step's logs.

        Returns the sub-output, its gathered (world·n, F) rewards and its gathered completions (as TRL
        logged them). Metrics and the completions table are restored to their state before the call.
        """
        saved_metrics = {k: list(v) for k, v in self._metrics[mode].items()}
        saved_logs = {
            k: list(v) if isinstance(v, deque) else {kk: list(vv) for kk, vv in v.items()}
            for k, v in self._logs.items()
        }
        sub_output = super()._generate_and_score_completions(sub_inputs)
        sub_rpf = self._last_rewards_per_func
        logged = list(self._logs["completion"])
        n_global = sub_rpf.size(0)
        completions = logged[-n_global:] if len(logged) >= n_global else None
        self._metrics[mode].clear()
        self._metrics[mode].update({k: v for k, v in saved_metrics.items()})
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        for k, v in self._logs.items():
            saved = saved_logs[k]
            if isinstance(v, deque):
                v.clear()
                v.extend(saved)
            else:
                for kk in list(v):
                    v[kk].clear()
                    if kk in saved:
                        v[kk].extend(saved[kk])
                    else:
                        del v[kk]
        return sub_output, sub_rpf, completions

    # ------------------------------------------------------------- protocol metrics (evaluation.py)
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """TRL's evaluation, plus the protocol metrics (``<prefix>_differad/…``) of the dataset evaluated."""
        with self._protocol_eval.target(self, eval_dataset):
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        output.metrics.update(self._protocol_eval.metrics(self, metric_key_prefix))  # {} outside evaluate()
        return output

    # --------------------------------------------------------------------------------------- logging
    def _logged_advantages_global(self, weights: torch.Tensor) -> torch.Tensor:
        """Global weighted advantages for the completions table (no collective: from the gathered rewards)."""
        rpf = self._last_rewards_per_func
        adv, _ = trl_advantages(
            rpf, self.reward_weights, self.num_generations, self.scale_rewards, self.multi_objective_aggregation
        )
        return adv * weights.to(adv.device, adv.dtype)

    def _replace_logged_advantages(self, advantages: torch.Tensor) -> None:
        _replace_tail(self._logs["advantages"], advantages.tolist())

    def _relog_after_resampling(
        self,
        mode: str,
        rewards_per_func: torch.Tensor,
        advantages: torch.Tensor,
        is_std_zero: torch.Tensor,
        completions: dict[int, Any],
    ) -> None:
        """Replace this step's reward metrics and completions-table rows with the post-resampling values."""
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            _replace_last(metrics[f"rewards/{name}/mean"], torch.nanmean(rewards_per_func[:, i]).item())
            _replace_last(metrics[f"rewards/{name}/std"], nanstd(rewards_per_func[:, i]).item())
            _replace_tail(self._logs["rewards"][name], rewards_per_func[:, i].tolist())
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        _replace_last(metrics["reward"], torch.nanmean(rewards).item())
        _replace_last(metrics["reward_std"], nanstd(rewards).item())
        _replace_last(metrics["frac_reward_zero_std"], is_std_zero.float().mean().item())
        _replace_tail(self._logs["advantages"], advantages.tolist())
        n = rewards_per_func.size(0)
        table = list(self._logs["completion"])
        if len(table) >= n:
            base = len(table) - n
            for row, completion in completions.items():
                if completion is not None:
                    table[base + row] = completion
            self._logs["completion"].clear()
            self._logs["completion"].extend(table)


def _resample_blocked_message(k: int, used: Sequence[str]) -> str:
    return (
        f"resample_rounds={k} is not supported together with {', '.join(used)}; group resampling regenerates "
        "single rows with TRL's transformers generation. Set resample_rounds=0."
    )


def _is_text_only_reward(func: Any) -> bool:
    """The core's format reward (judges the text only; its values say nothing about the box)."""
    from differad_rl.rewards import FormatReward

    return isinstance(func, FormatReward)


def _check_before_build(*args: Any, **kwargs: Any) -> None:
    """What ``DifferADGRPOTrainer`` can refuse before ``GRPOTrainer.__init__`` runs (it builds a
    colocated vLLM engine or waits up to 240 s for a vLLM server; without vLLM installed it raises
    TRL's import error): resampling with vLLM / rollout_func / tools / environments, and a
    training dataset missing the columns the box rewards read."""
    names = ("model", "reward_funcs", "args", "train_dataset")
    given = dict(zip(names, args))
    given.update({k: kwargs[k] for k in names if k in kwargs})
    cfg = given.get("args")
    k = int(getattr(cfg, "resample_rounds", 0) or 0)
    if k > 0:
        used = [name for name, on in (
            ("use_vllm=True", bool(getattr(cfg, "use_vllm", False))),
            ("rollout_func", kwargs.get("rollout_func") is not None),
            ("tools", bool(kwargs.get("tools"))),
            ("environment_factory", kwargs.get("environment_factory") is not None),
        ) if on]
        if used:
            raise ValueError(_resample_blocked_message(k, used))
    funcs = given.get("reward_funcs")
    funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs] if funcs is not None else []
    check_dataset_columns(given.get("train_dataset"), funcs)
    processor = kwargs.get("processing_class", args[5] if len(args) > 5 else None)
    if processor is not None and getattr(getattr(processor, "tokenizer", processor), "padding_side", "left") != "left":
        # TRL's own loader pads on the left; with a right-padded processor the image-token positions
        # and the log-probs of padded rows silently change (issue 10 item 1): make it right, loudly.
        import warnings

        from differad_rl.integrations.loading import force_left_padding

        warnings.warn("DifferADGRPOTrainer: processing_class pads on the right; set to left padding "
                      "(Qwen-VL generation and log-probs need it)", stacklevel=3)
        force_left_padding(processor)


def check_dataset_columns(dataset: Any, reward_funcs: Sequence[Any]) -> None:
    """Raise ``ValueError`` when ``dataset`` lacks a column that one of ``reward_funcs`` reads.

    Box rewards (:class:`~differad_rl.integrations.trl.rewards.TargetSizeReward`) read ``solution``
    (``boxes`` for the multi-box reward may replace it) and the target size, from ``image_size`` or
    the last image of ``images`` / ``image``. A dataset whose columns are unknown (an
    ``IterableDataset`` without features) is not checked.
    """
    from .rewards import TargetSizeReward

    columns = getattr(dataset, "column_names", None)
    if dataset is None or not columns:
        return
    columns = set(columns)
    for func in reward_funcs:
        if not isinstance(func, TargetSizeReward):
            continue
        need_box = {"solution", "boxes"} if func.multi_box else {"solution"}
        if not columns & need_box:
            raise ValueError(
                f"train_dataset has no {' or '.join(repr(c) for c in sorted(need_box))} column, which reward "
                f"{func.__name__!r} reads (the target's box(es) in original pixels, [0, 0, 0, 0] for a normal target); "
                f"its columns are {sorted(columns)}. Build it with differad_rl.integrations.trl.to_trl_dataset"
            )
        if not columns & {"image_size", "images", "image"}:
            raise ValueError(
                f"train_dataset has neither an 'image_size' column nor an 'images' / 'image' column, so reward "
                f"{func.__name__!r} cannot know the target image's size; its columns are {sorted(columns)}. "
                "Add image_size = [width, height] of the target (to_trl_dataset does)"
            )


def _replace_last(values: list, value: float) -> None:
    if values:
        values[-1] = value


def _replace_tail(values: deque, tail: list) -> None:
    """Overwrite the last ``len(tail)`` entries of a deque (TRL keeps one generation batch there)."""
    if len(values) < len(tail):
        return
    kept = list(values)[: len(values) - len(tail)]
    values.clear()
    values.extend(kept + tail)


__all__ += ["DifferADGRPOConfig"]
