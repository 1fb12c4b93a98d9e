"""Typed configuration: nested dataclasses validated at construction, YAML + dotted overrides."""

from dcd_megatron.configs.overrides import apply_overrides, from_dict, load_config, to_dict

__all__ = ["apply_overrides", "from_dict", "load_config", "to_dict"]
