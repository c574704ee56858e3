"""Quickstart (what ``python -m sgcd_jax.train`` runs with no --config).

A tiny random-init Decoder (2 layers, d=128) on a 1,024-token BPE trained on airline_lite's own text
with SmolLM2's special tokens and chat template (sgcd_jax/data/domain_tokenizer.py: SmolLM2's 49k vocab
made the LM head >90% of the step), trained on airline_lite (easy) on CPU: an SFT warm-up on an
imperfect demonstrator's conversations (below), then SGCD RL with the offline ContrastAnnotator. No network, API key or accelerator.

Sizes are set by what made the student copy ids at all (measured, see sgcd_jax/data/domain_tokenizer.py): a
whitespace-split domain BPE (ids tokenize the same in the request and in the tool call), one token per
recurring system-prompt line (prompt 84 tokens, demos 180-260 tokens) and 256 distinct demos.

What RL has to fix: the warm-up imitates an imperfect demonstrator that, on 70% of the tasks where there
is something to report (status, membership), looks it up correctly and then ends the chat with
``###STOP###`` without telling the user (airline_lite's "silent" shortcut, ``sft.demo_shortcut``). The
greedy post-SFT policy therefore never reports (eval success 0 at step 0), while sampling still reports
sometimes; the outcome reward (communicate_info) teaches it to report. Measured (96 held-out tasks,
greedy): 0.0 -> 0.25 / 0.31 / 0.32 / 0.32 after 5/10/15/20 iterations; status tasks 0 -> 0.86, above the
0.78 of the same warm-up on oracle-only demos. Copying reservation ids (cancel_ok) and user ids is what
this 2-layer model does not learn in 1,000 steps; RL does not teach it either (README, "Status").
A warm-up on oracle-only demos (``--config.sft.demo_shortcut_rate=0``) starts at 0.40 and RL does not
raise it (0.40 -> 0.31): the step-0 errors are ids and statuses guessed from the date, which 20
iterations of 32 episodes do not teach.
"""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("base")
    cfg.run.name = "quickstart"
    cfg.run.num_iterations = 20
    cfg.run.eval_every = 5
    cfg.run.checkpoint_every = 10
    cfg.model.source = "tiny"
    cfg.model.tokenizer = "domain-bpe"
    cfg.model.domain_vocab_size = 1024
    cfg.model.hidden_size = 128
    cfg.model.intermediate_size = 256
    cfg.model.num_layers = 2
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.head_dim = 32
    cfg.env.name = "airline_lite"
    cfg.env.difficulty = "easy"
    cfg.env.num_tasks = 256  # per split
    # A fresh DB every 8 tasks: the 256 demos name ~1,000 distinct users/flights/reservations instead of one
    # DB's 30 users, so SFT has to learn copying ids (post-SFT greedy success on 96 held-out tasks 0.15 -> 0.28).
    cfg.env.tasks_per_db = 8
    cfg.env.max_turns = 6
    cfg.rollout.tasks_per_iteration = 8
    cfg.rollout.group_size = 4
    cfg.rollout.max_new_tokens = 64  # the longest demo turn is ~50 domain-BPE tokens (tests/test_quickstart.py)
    cfg.rollout.max_total_tokens = 384  # demos are 180-260 tokens (84-token prompt)
    cfg.rollout.temperature = 0.7  # the learner scores at the same temperature (trainer/phases.vocab_config)
    cfg.annotation.name = "contrast"
    # The teacher must be able to read the reference: a compact "step k verdict" format (one token per step in
    # the domain tokenizer) and a quarter of every warm-up batch teaching it (trainer/reading_demos.py).
    cfg.annotation.reference_format = "compact"
    cfg.annotation.reference_tokens = 32  # header + one line per step (<= 6 turns) in ~14 tokens
    cfg.loss.credit = "sgcd"
    cfg.optim.learning_rate = 1e-4  # 3e-4 drifts the warm-up's priors (oracle-only warm-up: 0.40 -> 0.31)
    cfg.optim.warmup_steps = 0
    cfg.optim.micro_batch_size = 8
    cfg.sft.enabled = True
    cfg.sft.num_demos = 256
    cfg.sft.demo_shortcut = "silent"  # the imperfect demonstrator RL has to improve on (docstring)
    cfg.sft.demo_shortcut_rate = 0.7
    cfg.sft.steps = 1000  # ids are not copied at 400 steps; copying emerges between 400 and 800
    cfg.sft.batch_size = 8
    cfg.sft.reference_rate = 0.25  # 2 of 8 rows: an oracle-vs-shortcut pair's reference, target the oracle
    cfg.sft.learning_rate = 3e-3
    cfg.eval.num_tasks = 64
    cfg.eval.at_start = True  # step-0 eval of the post-SFT policy: the baseline RL must beat
    return cfg
