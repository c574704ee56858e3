"""Teaching the teacher to read a credit reference during the SFT warm-up (``sft.reference_rate``).

SGCD's teacher is the policy with a credit reference in its prompt. A small model that never saw one
ignores it: the quickstart's teacher scored credit localization AUROC 0.51 (chance) with the full ~400-
token prose reference. These rows teach reading with airline_lite's oracle: for each demo task and each
shortcut policy that applies to it and fails (``envs/airline_lite/oracle.py``), the oracle's conversation
(success) and the shortcut's (failure) form a sibling group, the offline contrast annotator writes their
reference, and two rows follow, both with the oracle's conversation as the target:

* the success's own reference (the steps that delivered the outcome marked helpful/decisive),
* the failure's own reference (the step where it went wrong marked harmful/fatal),

so "step k harmful" in the prompt comes to mean "at step k, not what the failed attempt did". The
targets are successful demonstrations only: the rows never teach the shortcut.

Those rows can be learned without reading *which* step is flagged (the target is the oracle whatever the
reference says: the rotated-reference control localizes as well). With ``annotation.reference_format=
"compact_quotes"`` the reference also quotes a successful sibling's action under a step line, and each
reading row of a one-lookup task whose reference quotes the oracle's reply gets a *drill* twin: the same
row with the tool results withheld (``WITHHELD``), so the reply it must produce is only in the quote.
A teacher that learned the drills copies a sibling's answer where it has one, which is what moves its
disagreement with a failed student onto the wrong content tokens. The student never sees a
reference (rollouts and eval render the bare prompt); it shares the weights, so its own behaviour can
shift too: the step-0 eval every method starts from is measured with the same warm-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from sgcd_jax import integration
from sgcd_jax.config import TrainConfig
from sgcd_jax.rollout.trajectory import Trajectory


WITHHELD = "(result withheld)"


def _withheld(conversation: dict[str, Any]) -> dict[str, Any]:
    """The conversation with every tool result replaced by ``WITHHELD``."""
    return {**conversation, "messages": [{**m, "content": WITHHELD} if m.get("role") == "tool" else dict(m)
                                         for m in conversation["messages"]]}


def reading_demonstrations(env_factory: Any, chat: Any, config: TrainConfig) -> list[Trajectory]:
    """SFT rows whose prompt carries a credit reference (``annotation.reference_format``), built from
    the demo split's first ``sft.num_demos`` tasks; [] when ``sft.reference_rate`` is 0."""
    if config.sft.reference_rate == 0.0:
        return []
    from sgcd_jax.credit.contrast import ContrastAnnotator, reply_text
    from sgcd_jax.credit.selection import SiblingGroup
    from sgcd_jax.credit.teacher import build_teacher_inputs, render_credit_text
    from sgcd_jax.envs.airline_lite.oracle import SHORTCUTS, demo_conversation, play, shortcut_actions

    split = integration.demo_split(config.env.train_split)
    style = config.annotation.reference_format
    annotator, rows = ContrastAnnotator(), []
    budget = config.rollout.max_total_tokens  # the oracle demos the plain warm-up keeps (integration.demonstrations)
    for task in env_factory.tasks(split)[:config.sft.num_demos]:
        oracle = demo_conversation(env_factory, task)
        if oracle["reward"] < 1.0:
            continue
        oracle_ids = integration.demo_trajectory(oracle, chat, task.task_id)  # rendered once, shared by every pair
        if len(oracle_ids.token_ids) > budget:
            continue
        drill_ids = None  # the oracle with its tool result withheld: one-lookup tasks, compact_quotes only
        if style == "compact_quotes" and len(task.payload["actions"]) == 1:
            drill_ids = integration.demo_trajectory(_withheld(oracle), chat, task.task_id)
        oracle_reply = reply_text(oracle_ids)  # as the annotator quotes it
        for kind in SHORTCUTS:
            actions = shortcut_actions(task, kind)
            if actions is None:
                continue
            reward, info, conversation = play(env_factory.make(), task, actions)
            if reward >= 1.0:  # the shortcut happened to succeed: no contrast to teach
                continue
            group_id = f"read/{task.task_id}/{kind}"
            good = dataclasses.replace(oracle_ids, group_id=group_id, sample_index=0)
            bad = dataclasses.replace(integration.demo_trajectory({**conversation, "reward": reward, "info": info},
                                                                  chat, task.task_id),
                                      group_id=group_id, sample_index=1)
            reference = annotator.reference(SiblingGroup(group_id, task.task_id, [good, bad], [True, False]))
            for reader in (good, bad):
                context = render_credit_text(reference, reader, style=style)
                targets = [("", good)]
                quotes = reference.actions(reader.sample_index, reader.num_steps)
                if drill_ids is not None and oracle_reply and oracle_reply in quotes:
                    targets.append(("/drill", dataclasses.replace(drill_ids, group_id=group_id, sample_index=0)))
                for suffix, target in targets:
                    row = build_teacher_inputs(target, context, chat.render_prompt_ids, oracle["tools"])
                    rows.append(Trajectory(
                        task_id=task.task_id, group_id=f"{group_id}/{reader.sample_index}{suffix}", sample_index=0,
                        token_ids=row.token_ids, loss_mask=row.loss_mask, step_ids=row.step_ids,
                        sampler_logprobs=np.zeros(len(row.token_ids), np.float32),
                        prompt_len=row.teacher_prompt_len, messages=target.messages, steps=target.steps,
                        reward=1.0))
    if not rows:
        raise ValueError("sft.reference_rate > 0 but no oracle demo that fits rollout.max_total_tokens has a failing "
                         "shortcut to contrast with: raise rollout.max_total_tokens or set sft.reference_rate=0")
    return rows


def sft_batch(step: int, demos: Sequence[Trajectory], reading: Sequence[Trajectory], config: TrainConfig,
              orders: tuple[np.ndarray, np.ndarray]) -> list[Trajectory]:
    """The ``sft.batch_size`` rows of warm-up step ``step``: ``round(reference_rate * batch)`` reading rows
    (at least one when the rate is > 0), the rest plain demos, each list cycled in its seeded order."""
    batch = config.sft.batch_size
    n_read = min(batch - 1, max(1, round(config.sft.reference_rate * batch))) if reading else 0
    n_demo = batch - n_read
    demo_order, read_order = orders
    return ([demos[demo_order[(step * n_demo + j) % len(demos)]] for j in range(n_demo)]
            + [reading[read_order[(step * n_read + j) % len(reading)]] for j in range(n_read)])
