"""The names Lookahead keeps things under, in one table: its settings' keys in every param group,
its per-parameter state (``Lookahead.lookahead_state[param][...]``), and its entries in state
dicts."""

from __future__ import annotations

# -- settings: keys of every param group, beside the inner optimizer's hyperparameters (prefixed:
# RMSprop already has an ``alpha``) ----------------------------------------------------------------
K = "lookahead_k"
ALPHA = "lookahead_alpha"
INNER_STATE = "lookahead_inner_state"
SLOW_DTYPE = "lookahead_slow_dtype"
NONFINITE = "lookahead_nonfinite"
MOMENTUM = "lookahead_momentum"
NESTEROV = "lookahead_nesterov"
SETTINGS = (K, ALPHA, INNER_STATE, SLOW_DTYPE, NONFINITE, MOMENTUM, NESTEROV)


def parameter_name(group_index: int, param_index: int) -> str:
    """How messages name a parameter."""
    return f"parameter {param_index} of param group {group_index}"


# -- per-parameter state -------------------------------------------------------------------------
SLOW_PARAM = "slow_param"
OUTER_MOMENTUM = "outer_momentum"  # the outer step's momentum buffer, in the slow dtype
STEP = "step"  # a param group's steps since its last sync, kept with its first parameter
RESTORES = "nonfinite_restores"  # likewise: the group's syncs that restored instead

# The inner optimizer's first-moment buffers that inner_state="pullback" interpolates: SGD and
# RMSprop keep `momentum_buffer` (when momentum > 0); Adam, AdamW, Adamax, NAdam and RAdam keep
# `exp_avg`. Each one's slow copy is kept under slow_copy_of(its name).
FIRST_MOMENT_BUFFERS = ("momentum_buffer", "exp_avg")


def slow_copy_of(buffer: str) -> str:
    """The key of the slow copy of the inner optimizer's buffer ``buffer``."""
    return "slow_" + buffer


SLOW_BUFFERS = tuple(slow_copy_of(name) for name in FIRST_MOMENT_BUFFERS)

# -- state dicts ---------------------------------------------------------------------------------
# Lookahead's entries in ``state_dict()["state"][i]``, beside the inner optimizer's, are the
# per-parameter state above with this prefix, and these:
STATE_PREFIX = "lookahead_"
# Only in a state dict taken in evaluation mode, where the parameters hold the slow weights: the
# fast weights.
FAST_PARAM = "fast_param"
# With streamed averages (Lookahead(sync_delay=...)), in every parameter's entry, so that the keys
# do not depend on the step a dict was taken at (torch.distributed.checkpoint loads only the keys
# of a dict taken from the optimizer it loads into): whether the parameter's fragment had an
# average in flight (IN_FLIGHT_NONE, IN_FLIGHT_AVERAGE or, to restore instead, IN_FLIGHT_RESTORE),
# and that average in the slow dtype (zeros when none). The same on every worker, so not stacked.
IN_FLIGHT = "in_flight"
IN_FLIGHT_VALUE = "in_flight_average"
IN_FLIGHT_NONE, IN_FLIGHT_AVERAGE, IN_FLIGHT_RESTORE = 0, 1, 2
# Only with a process group (DiLoCo), where each worker's replica differs between syncs: every
# worker's fast weights and inner optimizer state, stacked along a first dimension of the group's
# size, so that one process can save the dict and every process resume its own replica from it.
WORKER = "worker_"
WORKER_FAST_PARAM = WORKER + FAST_PARAM
# Beside a stacked entry that some workers do not have (an inner optimizer creates its state
# lazily: a parameter that got no gradient on one worker has none there): which workers lack it,
# as a bool tensor of the group's size. Their rows are placeholders, not loaded.
WORKER_ABSENT = "worker_absent_"
