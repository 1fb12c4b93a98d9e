"""The parallel layout (TP x PP x CP x DP) as a typed config, validated before anything starts."""

from dataclasses import dataclass

from dcd_megatron.errors import UserError


class LayoutError(UserError, ValueError):
    """An impossible parallel layout, named with the fix."""


@dataclass
class ParallelConfig:
    """Tensor, pipeline and context parallel sizes; data parallel is what is left of the world."""

    tp: int = 1  # tensor parallel size (divides heads and query groups)
    pp: int = 1  # pipeline parallel size (divides layers)
    cp: int = 1  # context parallel size (needs Transformer Engine; seq_length divisible by 2*cp)
    sequence_parallel: bool = False  # shard activations along the sequence inside TP regions (needs TE)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("parallel.sequence_parallel needs parallel.tp > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


@dataclass(frozen=True)
class Layout:
    """A validated layout for one world size."""

    tp: int
    pp: int
    cp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def check_model_split(
    tp: int,
    pp: int,
    *,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    ffn_hidden_size: int,
    tp_name: str = "parallel.tp",
    pp_name: str = "parallel.pp",
    whose: str = "model.",
) -> None:
    """Raise LayoutError unless TP splits the heads, query groups and FFN evenly and PP the layers.

    megatron-core would otherwise stop with a bare assertion deep in a layer constructor.
    """
    for what, size in (("num_attention_heads", num_attention_heads), ("num_query_groups", num_query_groups),
                       ("ffn_hidden_size", ffn_hidden_size)):
        if size % tp:
            raise LayoutError(f"{tp_name}={tp} must divide {whose}{what}={size}; choose a {tp_name} that divides it")
    if num_layers % pp:
        raise LayoutError(f"{pp_name}={pp} must divide {whose}num_layers={num_layers}; choose a {pp_name} that divides it")


def validate_layout(
    parallel: ParallelConfig,
    *,
    world_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    ffn_hidden_size: int,
    seq_length: int,
    global_batch_size: int,
    micro_batch_size: int,
    has_te: bool,
) -> Layout:
    """Check that the layout can run this model on this world; return it with DP filled in."""
    mp = parallel.model_parallel_size
    if world_size % mp:
        raise LayoutError(
            f"world size {world_size} is not divisible by tp*pp*cp = {parallel.tp}*{parallel.pp}*"
            f"{parallel.cp} = {mp}; launch a multiple of {mp} processes or change the layout"
        )
    dp = world_size // mp
    check_model_split(
        parallel.tp, parallel.pp, num_layers=num_layers, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups, ffn_hidden_size=ffn_hidden_size,
    )
    if parallel.cp > 1:
        if not has_te:
            raise LayoutError(
                "parallel.cp > 1 needs Transformer Engine's attention (a GPU with the `gpu` extra "
                "installed); megatron-core's local attention has no context parallelism. Use cp=1 here"
            )
        if seq_length % (2 * parallel.cp):
            raise LayoutError(
                f"data.seq_length={seq_length} must be divisible by 2*cp={2 * parallel.cp} "
                "(context parallelism splits each sequence into 2*cp load-balanced chunks)"
            )
    if parallel.sequence_parallel and not has_te:
        raise LayoutError(
            "parallel.sequence_parallel needs Transformer Engine's layers (a GPU with the `gpu` extra "
            "installed): megatron-core's local layer spec uses torch norms, which have no sequence "
            "parallelism. Set parallel.sequence_parallel=false here"
        )
    if parallel.sequence_parallel and seq_length % parallel.tp:
        raise LayoutError(f"data.seq_length={seq_length} must be divisible by tp for sequence_parallel")
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        raise LayoutError(
            f"train.global_batch_size={global_batch_size} must be a multiple of "
            f"train.micro_batch_size*dp = {micro_batch_size}*{dp} = {per_step}"
        )
    return Layout(tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, dp=dp)
