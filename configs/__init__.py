"""Experiment configs (ml_collections). ``base.py`` holds the full schema with the official
recipe as defaults; the others change a few fields. Facts about a variant (resolution, dropout,
stochastic depth) come from ``efficientnet.arch`` through ``base.variant_config``, never
restated here. Configs import ml_collections and ``efficientnet.arch`` only."""

import difflib
from typing import Any


def all_keys(config: Any, prefix: str = '') -> list[str]:
    """Every dotted key of ``config``, groups and fields."""
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, 'items'):
            keys += all_keys(v, prefix + k + '.')
    return keys


def key_problem(config: Any, key: str) -> str | None:
    """Why the dotted ``key`` names no single field of ``config`` (with the closest keys as a
    hint), or None if it does: the check of every ``--config.key=value`` override, in
    train.py and in sweeps."""
    node = config
    for part in key.split('.'):
        if not hasattr(node, 'items') or part not in node:
            close = difflib.get_close_matches(key, all_keys(config), n=3)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            return f'unknown config key {key!r}{hint}'
        node = node[part]
    if hasattr(node, 'items'):
        return f'{key!r} is a group of fields, not one field; override its fields'
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def parse_config(config_spec: str, overrides: list[str] = ()) -> Any:
    """The locked config that ``--config=config_spec`` and the ``--config.key=value``
    arguments in ``overrides`` give, parsed exactly as train.py parses them
    (``ml_collections.config_flags``); raises what that parsing raises."""
    from absl import flags
    from ml_collections import config_flags

    argv = ['train.py', f'--config={config_spec}', *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    config.items()  # a file that failed to load raises only when the config is used
    return config


def override_problems(config_spec: str, overrides: list[str]) -> list[str]:
    """Why ``--config=config_spec`` or each ``--config.key=value`` in ``overrides`` would fail,
    parsed one at a time exactly as train.py parses them (``parse_config``): a config file
    that does not load, an unknown key (with the closest keys), a value that does not parse as
    the field's type. One line each, all of them (absl stops at the first); [] when every one
    applies."""
    try:
        config = parse_config(config_spec)
    except Exception as e:  # noqa: BLE001 - whatever loading the user's file raised
        return [f'--config={config_spec}: {_first_line(e)}']
    problems = []
    for arg in overrides:
        name = arg.split('=', 1)[0].lstrip('-')
        key = name.split('.', 1)[1] if '.' in name else name
        problem = key_problem(config, key)
        if problem is None:
            try:
                parse_config(config_spec, [arg])
            except Exception as e:  # noqa: BLE001 - flags.Error and what config_flags lets out
                problem = _first_line(e)
        if problem is not None:
            problems.append(f'{arg}: {problem}' if not problem.startswith('flag ') else problem)
    return problems
