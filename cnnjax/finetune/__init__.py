"""Fine-tuning: `config.finetune`, freezing by path pattern, new heads, first-conv channels, LR groups.

Every pattern is a Python regex searched (re.search) in a parameter's path inside its collection,
e.g. "layer1_0/conv1/kernel" or "stem_bn/mean". The engine (cnnjax.train.loop) turns the config
into a `Plan` before building the optimizer, and `merge_variables` decides, leaf by leaf, what an
`init_from` checkpoint provides and what starts fresh.
"""

from cnnjax.finetune.load import (
    LoadReport,
    MLPHead,
    adapt_first_conv,
    build_model,
    merge_variables,
    replace_head,
)
from cnnjax.finetune.plan import (
    BATCH_STATS_MODES,
    DEFAULT_GROUP,
    FIRST_CONV_MODES,
    FROZEN,
    FROZEN_BN_MODES,
    Plan,
    check_config,
    finetune_config,
    freeze_mask,
    keep_frozen,
    keep_frozen_stats,
    leaf_names,
    lr_groups,
    make_optimizer,
    make_plan,
    matches,
    multi_lr_optimizer,
    param_labels,
    path_name,
    regexes,
    resolve_config,
    running_stats_bn,
    stop_frozen_gradients,
)

__all__ = [
    "BATCH_STATS_MODES", "DEFAULT_GROUP", "FIRST_CONV_MODES", "FROZEN", "FROZEN_BN_MODES",
    "LoadReport", "MLPHead", "Plan", "adapt_first_conv", "build_model", "check_config",
    "finetune_config", "freeze_mask", "keep_frozen", "keep_frozen_stats", "leaf_names", "lr_groups",
    "make_optimizer", "make_plan", "matches", "merge_variables", "multi_lr_optimizer", "param_labels",
    "path_name", "regexes", "replace_head", "resolve_config", "running_stats_bn",
    "stop_frozen_gradients",
]
