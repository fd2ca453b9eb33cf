"""CPConfig: the one documented context-parallel state, and its validation.

Pure Python (no torch.distributed): the CLI, the Megatron argument hook and the runtime all validate
through :meth:`CPConfig.validate`, so an impossible configuration is refused before any collective.

Every error names the flags and the values involved, e.g.::

    --num-attention-heads 6 is not divisible by --tensor-model-parallel-size 2 x
    --context-parallel-size 4 (ulysses_cp_algo)
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

ULYSSES = "ulysses_cp_algo"
RING = "megatron_cp_algo"
HYBRID = "hybrid_cp_algo"
KVALLGATHER = "kvallgather_cp_algo"
ALGORITHMS = (ULYSSES, RING, HYBRID, KVALLGATHER)
MASK_TYPES = ("causal", "general")
KV_CACHE_POLICIES = ("full", "half")  # --context-parallel-kv-cache-policy (None: off); mindspeed_cp.kv_cache


class CPConfigError(ValueError):
    """A context-parallel configuration that cannot run. The message names the flags involved."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive_int(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CPConfigError(
            f"{flag} {value!r} must be a positive integer"
            + ("" if isinstance(value, int) else f" (got {type(value).__name__})")
        )


@dataclass(frozen=True)
class CPConfig:
    """The context-parallel options (MindSpeed's flag names and defaults).

    ``context_parallel_size``   ``--context-parallel-size`` (Megatron's own flag): ranks sharing a sequence.
    ``context_parallel_algo``   ``ulysses_cp_algo`` (default) | ``megatron_cp_algo`` (ring) | ``hybrid_cp_algo`` |
                                ``kvallgather_cp_algo`` (K/V all-gathered, dK/dV reduce-scattered).
    ``ulysses_degree_in_cp``    hybrid only: ranks per Ulysses group (U); the ring then has CP/U ranks.
    ``cp_window_size``          ring/hybrid: >1 selects Double Ring with inner windows of this many ranks.
    ``use_cp_send_recv_overlap``  ring/hybrid: send and receive on two communicators (every exchange is posted
                                before the block it overlaps, with or without it).
    ``megatron_cp_in_bnsd``     ring/hybrid: compute blocks in ``[b, n, s, d]`` layout.
    ``attention_mask_type``     ``causal`` (default) | ``general`` (explicit boolean mask, True = masked).
    ``context_parallel_kv_cache_policy``  None (default) | ``full`` | ``half``: which K/V backward keeps instead of
                                communicating again (:mod:`mindspeed_cp.kv_cache`).
    ``context_parallel_cache_interval``   0 (default): the policy applies to every layer; N > 0: only to layers
                                with ``layer_number % (N+1) == 1``.
    ``use_ulysses_allgather_kv``  Ulysses: K/V by all-gather (GQA with KV heads <= CP), Q by all-to-all.
    ``cp_allgather_overlap``    kvallgather: split the gather by KV heads, overlapped with compute (default True;
                                ``--no-cp-allgather-overlap``: one gather waited for before any compute).
    ``hybrid_outer_cp_algo``    hybrid only: the outer level over the ring group, ``megatron_cp_algo`` (the ring or
                                Double Ring, default) or ``kvallgather_cp_algo`` (the K/V all-gather, on the KV
                                heads each Ulysses rank holds after its all-to-all).
    ``window_attn_cp_algo``     the algorithm of the sliding-window layers (``--window-size``, the layers
                                ``--window-attn-skip-freq`` leaves windowed); None (default): the same as the others.
                                ``megatron_cp_algo`` runs the window-aware ring over the CP group on whatever layout
                                the batch has (``kvallgather_cp_algo``: the same halo exchange - the all-gather of
                                what the windows reach); ``ulysses_cp_algo`` an all-to-all over the CP group;
                                ``hybrid_cp_algo`` only under ``--context-parallel-algo hybrid_cp_algo`` (its groups).
    """

    context_parallel_size: int = 1
    context_parallel_algo: str = ULYSSES
    ulysses_degree_in_cp: Optional[int] = None
    cp_window_size: int = 1
    use_cp_send_recv_overlap: bool = False
    megatron_cp_in_bnsd: bool = False
    attention_mask_type: str = "causal"
    context_parallel_kv_cache_policy: Optional[str] = None
    context_parallel_cache_interval: int = 0
    use_ulysses_allgather_kv: bool = False
    cp_allgather_overlap: bool = True
    window_attn_cp_algo: Optional[str] = None
    hybrid_outer_cp_algo: str = RING

    # ------------------------------------------------------------------ construction
    @classmethod
    def fields(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_namespace(cls, namespace: Any = None, **flags: Any) -> "CPConfig":
        """Build from an argparse namespace (Megatron's ``args``) and/or keyword flags (flags win).

        Attributes the namespace lacks keep their defaults; ``None`` for an option whose default is not
        ``None`` also keeps the default (argparse leaves unset ints as None in some Megatron versions).
        """
        unknown = sorted(set(flags) - set(cls.fields()))
        if unknown:
            raise CPConfigError(
                f"unknown context-parallel option(s) {', '.join(unknown)}; known: {', '.join(cls.fields())}"
            )
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in flags:
                values[f.name] = flags[f.name]
            elif namespace is not None and getattr(namespace, f.name, None) is not None:
                values[f.name] = getattr(namespace, f.name)
        for name, value in list(values.items()):
            if value is None and getattr(cls, name) is not None:
                del values[name]
        return cls(**values)

    # ------------------------------------------------------------------ derived sizes
    @property
    def cp(self) -> int:
        return self.context_parallel_size

    @property
    def ulysses_size(self) -> int:
        """Ranks in one Ulysses all-to-all group (1 when the algorithm has no Ulysses level)."""
        if self.cp == 1:
            return 1
        if self.context_parallel_algo == ULYSSES:
            return self.cp
        if self.context_parallel_algo == HYBRID:
            return self.ulysses_degree_in_cp
        return 1

    @property
    def ring_size(self) -> int:
        """Ranks in one KV ring (1 when the algorithm has no ring level)."""
        return self.cp // self.ulysses_size

    @property
    def is_double_ring(self) -> bool:
        return self.ring_size > 1 and self.cp_window_size > 1

    def kv_cache_policy(self, layer_number: int) -> Optional[str]:
        """The KV-cache policy of the layer ``layer_number`` (1-based, Megatron's): every layer when
        ``--context-parallel-cache-interval`` is 0, else those with ``layer_number % (N+1) == 1``."""
        n = self.context_parallel_cache_interval
        if self.cp == 1 or (n and layer_number % (n + 1) != 1):
            return None
        return self.context_parallel_kv_cache_policy

    def layer_algo(self, windowed: bool) -> str:
        """The algorithm of a layer: a sliding-window one runs ``--window-attn-cp-algo`` when it is set."""
        return self.window_attn_cp_algo if windowed and self.window_attn_cp_algo else self.context_parallel_algo

    @property
    def gathers_kv(self) -> bool:
        """The K/V all-gather runs: ``kvallgather_cp_algo``, or Hybrid with it as the outer level."""
        return self.context_parallel_algo == KVALLGATHER or (
            self.context_parallel_algo == HYBRID and self.hybrid_outer_cp_algo == KVALLGATHER
        )

    @property
    def uses_zigzag(self) -> bool:
        """Ring, Hybrid and the K/V all-gather shard the sequence in 2*ring zigzag chunks (causal load balance;
        for ``kvallgather_cp_algo`` the "ring" is its all-gather group)."""
        return self.ring_size > 1

    def padded_seq_len(self, seq_len: int) -> int:
        """The length a batch is padded to at its end before the split: the next multiple of 2 x CP for Ring and
        Hybrid (their zigzag needs 2*CP equal chunks), the length itself otherwise. Exact for causal attention (no
        real token sees a later pad) and for general masks (their pad columns are masked)."""
        m = 2 * self.cp
        return -(-seq_len // m) * m if self.cp > 1 and self.uses_zigzag else seq_len

    # ------------------------------------------------------------------ validation
    def validate(
        self,
        *,
        tensor_model_parallel_size: int = 1,
        num_attention_heads: Optional[int] = None,
        num_query_groups: Optional[int] = None,
        seq_length: Optional[int] = None,
        world_size: Optional[int] = None,
        pipeline_model_parallel_size: int = 1,
        num_layers: Optional[int] = None,
    ) -> "CPConfig":
        """Check this configuration against the model and layout; raise :class:`CPConfigError`.

        Arguments left as None are not checked (e.g. the CLI knows no head count). Returns ``self``.

        Types are strict everywhere: the on/off options take ``bool`` only, sizes, head counts, lengths and layer
        counts positive ``int`` only (a string such as ``"8"`` is refused with the flag's name).
        With ``context_parallel_size=1`` no CP algorithm runs (Megatron keeps its own attention), so the rules
        relative to CP (hybrid degrees, window vs ring size, ring-only options under Ulysses, a KV-cache policy,
        the Ulysses all-gather) are not applied - the options are type-checked only: a launch script keeps its CP
        flags for its CP=1 baseline run.
        """
        self._validate_options()
        for flag, value in (
            ("--num-attention-heads", num_attention_heads),
            ("--num-query-groups", num_query_groups),
            ("--seq-length", seq_length),
            ("--num-layers", num_layers),
            ("world size", world_size),
        ):
            if value is not None:
                _positive_int(flag, value)
        self._validate_layout(world_size, tensor_model_parallel_size, pipeline_model_parallel_size)
        self._validate_heads(tensor_model_parallel_size, num_attention_heads, num_query_groups)
        self._validate_kv_cache(tensor_model_parallel_size, num_attention_heads, num_query_groups, num_layers)
        if seq_length is not None:
            self._validate_seq(seq_length)
        return self

    def _validate_options(self) -> None:
        algo, cp = self.context_parallel_algo, self.context_parallel_size
        for name in (
            "use_cp_send_recv_overlap",
            "megatron_cp_in_bnsd",
            "use_ulysses_allgather_kv",
            "cp_allgather_overlap",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise CPConfigError(
                    f"{_flag(name)} must be True or False, got {value!r} "
                    f"({type(value).__name__}; a string such as 'false' would switch it on)"
                )
        if not isinstance(algo, str) or algo not in ALGORITHMS:
            raise CPConfigError(f"--context-parallel-algo {algo!r} is not one of {', '.join(ALGORITHMS)}")
        if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
            raise CPConfigError(f"--context-parallel-size {cp!r} must be a positive integer")
        if not isinstance(self.attention_mask_type, str) or self.attention_mask_type not in MASK_TYPES:
            raise CPConfigError(
                f"--attention-mask-type {self.attention_mask_type!r} is not one of {', '.join(MASK_TYPES)}"
            )
        k = self.cp_window_size
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise CPConfigError(f"--cp-window-size {k!r} must be an integer >= 1")
        u = self.ulysses_degree_in_cp
        if u is not None and (not isinstance(u, int) or isinstance(u, bool) or u < 1):
            raise CPConfigError(f"--ulysses-degree-in-cp {u!r} must be a positive integer")
        w = self.window_attn_cp_algo
        if w is not None and (not isinstance(w, str) or w not in ALGORITHMS):
            raise CPConfigError(f"--window-attn-cp-algo {w!r} is not one of {', '.join(ALGORITHMS)} (or unset)")
        if w == HYBRID and algo != HYBRID and cp > 1:
            raise CPConfigError(
                f"--window-attn-cp-algo hybrid_cp_algo needs --context-parallel-algo hybrid_cp_algo (its Ulysses "
                f"and ring groups; got {algo}): use ulysses_cp_algo or megatron_cp_algo for the windowed layers"
            )

        if algo == HYBRID and cp > 1:
            if u is None:
                raise CPConfigError(
                    f"--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp "
                    f"(a divisor of --context-parallel-size {cp})"
                )
            if cp % u:
                raise CPConfigError(
                    f"--ulysses-degree-in-cp {u} does not divide --context-parallel-size {cp} (hybrid_cp_algo)"
                )
            if u == cp:
                raise CPConfigError(
                    f"--ulysses-degree-in-cp {u} equals --context-parallel-size {cp}: the ring level would be "
                    f"empty; use --context-parallel-algo ulysses_cp_algo"
                )
            if u == 1:
                raise CPConfigError(
                    f"--ulysses-degree-in-cp 1 leaves no Ulysses level in --context-parallel-size {cp}; "
                    f"use --context-parallel-algo megatron_cp_algo"
                )
        elif u is not None and u != 1 and cp > 1:
            raise CPConfigError(
                f"--ulysses-degree-in-cp {u} only applies to --context-parallel-algo hybrid_cp_algo (got {algo})"
            )

        ring_only = [
            name
            for name, on in (
                ("use_cp_send_recv_overlap", self.use_cp_send_recv_overlap),
                ("megatron_cp_in_bnsd", self.megatron_cp_in_bnsd),
            )
            if on
        ]
        if cp > 1 and algo in (ULYSSES, KVALLGATHER) and (ring_only or k > 1):
            names = [_flag(n) for n in ring_only] + ([f"--cp-window-size {k}"] if k > 1 else [])
            raise CPConfigError(
                f"{', '.join(names)} only apply to the ring level (megatron_cp_algo or hybrid_cp_algo); "
                f"--context-parallel-algo {algo} would ignore them"
            )
        outer = self.hybrid_outer_cp_algo
        if outer not in (RING, KVALLGATHER):
            raise CPConfigError(f"--hybrid-outer-cp-algo {outer!r} is not one of {RING}, {KVALLGATHER}")
        if cp > 1 and outer != RING and algo != HYBRID:
            raise CPConfigError(
                f"--hybrid-outer-cp-algo {outer} only applies to --context-parallel-algo hybrid_cp_algo "
                f"(got {algo}, which would ignore it)"
            )
        if cp > 1 and algo == HYBRID and outer == KVALLGATHER and (ring_only or k > 1):
            names = [_flag(n) for n in ring_only] + ([f"--cp-window-size {k}"] if k > 1 else [])
            raise CPConfigError(
                f"{', '.join(names)} only apply to a ring; --hybrid-outer-cp-algo kvallgather_cp_algo has none "
                f"at the outer level"
            )
        if cp > 1 and not self.gathers_kv and not self.cp_allgather_overlap:
            raise CPConfigError(
                f"--no-cp-allgather-overlap only applies to --context-parallel-algo kvallgather_cp_algo or "
                f"hybrid_cp_algo with --hybrid-outer-cp-algo kvallgather_cp_algo (got {algo}, which would ignore it)"
            )
        if k > 1 and cp > 1:  # CP=1 runs no CP algorithm: its options are type-checked only (see the docstring)
            ring = self.ring_size
            where = (
                "--context-parallel-size"
                if algo != HYBRID
                else "the ring size --context-parallel-size / --ulysses-degree-in-cp"
            )
            if ring % k:
                raise CPConfigError(f"--cp-window-size {k} does not divide {where} ({ring}) ({algo})")
            if k >= ring:
                raise CPConfigError(
                    f"--cp-window-size {k} must be smaller than {where} ({ring}) for Double Ring; "
                    f"use --cp-window-size 1 for a single ring ({algo})"
                )

    def _validate_kv_cache(self, tp, heads, kv_heads, num_layers) -> None:
        """MindSpeed's rules for the KV-cache flags (its ``validate_args``), and ours for the all-gather. One
        difference: MindSpeed refuses a policy at CP=1; here, as every CP option, it is type-checked only there."""
        policy, n, gather = (
            self.context_parallel_kv_cache_policy,
            self.context_parallel_cache_interval,
            self.use_ulysses_allgather_kv,
        )
        if policy is not None and policy not in KV_CACHE_POLICIES:
            raise CPConfigError(
                f"--context-parallel-kv-cache-policy {policy!r} is not one of {', '.join(KV_CACHE_POLICIES)} (or unset)"
            )
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise CPConfigError(f"--context-parallel-cache-interval {n!r} must be an integer >= 0")
        if n and policy is None:
            raise CPConfigError(
                f"--context-parallel-cache-interval {n} only applies with --context-parallel-kv-cache-policy full|half"
            )
        if n and num_layers is not None and n >= num_layers:
            raise CPConfigError(f"--context-parallel-cache-interval {n} must be smaller than --num-layers {num_layers}")
        if not gather or self.cp == 1:  # CP=1 runs no CP algorithm: type checks only (validate's docstring)
            return
        if self.context_parallel_algo != ULYSSES:
            raise CPConfigError(
                f"--use-ulysses-allgather-kv needs --context-parallel-algo ulysses_cp_algo "
                f"(got {self.context_parallel_algo})"
            )
        if heads is None:
            return
        kv = heads if kv_heads is None else kv_heads
        kv_local = kv // tp
        if kv == heads:
            raise CPConfigError(
                f"--use-ulysses-allgather-kv needs grouped-query attention (--group-query-attention "
                f"--num-query-groups < --num-attention-heads {heads})"
            )
        if kv_local > self.cp or self.cp % kv_local:
            raise CPConfigError(
                f"--use-ulysses-allgather-kv gathers all {kv_local} KV heads per tensor-parallel rank "
                f"(--num-query-groups {kv} / --tensor-model-parallel-size {tp}) on every rank: it needs at most "
                f"--context-parallel-size {self.cp} of them, dividing it (more are cheaper through the all-to-all)"
            )

    def _validate_layout(self, world_size, tp, pp) -> None:
        for name, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
            _positive_int(name, v)
        if world_size is None:
            return
        mp = tp * pp * self.cp
        if world_size % mp:
            raise CPConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                f"--pipeline-model-parallel-size {pp} x --context-parallel-size {self.cp} (= {mp})"
            )

    def _validate_heads(self, tp, heads, kv_heads) -> None:
        if heads is None:
            return
        algo, cp = self.context_parallel_algo, self.cp
        if heads % tp:
            raise CPConfigError(f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}")
        kv = heads if kv_heads is None else kv_heads
        if kv < 1 or heads % kv:
            raise CPConfigError(f"--num-query-groups {kv} does not divide --num-attention-heads {heads}")
        if kv % tp:
            raise CPConfigError(f"--num-query-groups {kv} is not divisible by --tensor-model-parallel-size {tp}")
        if self.window_attn_cp_algo == ULYSSES and algo != ULYSSES and cp > 1 and heads % (tp * cp):
            raise CPConfigError(
                f"--window-attn-cp-algo ulysses_cp_algo: --num-attention-heads {heads} is not divisible by "
                f"--tensor-model-parallel-size {tp} x --context-parallel-size {cp} (the windowed layers' all-to-all)"
            )
        u = self.ulysses_size
        if u == 1:
            return
        if heads % (tp * u):
            if algo == ULYSSES:
                raise CPConfigError(
                    f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp} x "
                    f"--context-parallel-size {cp} (ulysses_cp_algo)"
                )
            raise CPConfigError(
                f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp} x "
                f"--ulysses-degree-in-cp {u} (hybrid_cp_algo)"
            )
        # GQA: each Ulysses rank needs whole KV heads. With fewer local KV heads than Ulysses ranks they
        # are replicated (u % kv_local == 0); with more they are scattered (kv_local % u == 0).
        kv_local = kv // tp
        if (kv_local < u and u % kv_local) or (kv_local >= u and kv_local % u):
            deg = "--context-parallel-size" if algo == ULYSSES else "--ulysses-degree-in-cp"
            raise CPConfigError(
                f"--num-query-groups {kv} / --tensor-model-parallel-size {tp} = {kv_local} KV heads per "
                f"tensor-parallel rank cannot be shared evenly by {deg} {u} Ulysses ranks "
                f"(one must divide the other) ({algo})"
            )

    def _validate_seq(self, seq: int) -> None:
        cp = self.cp
        if cp == 1 or self.uses_zigzag:  # Ring/Hybrid: any length, batches are padded at their end
            return  # (sharding.padded_seq_len)
        if seq < cp:
            raise CPConfigError(
                f"--seq-length {seq} is shorter than --context-parallel-size {cp}: every rank must hold "
                f"at least one token (ulysses_cp_algo)"
            )

    # ------------------------------------------------------------------ model features
    def feature_problem(self, softmax_type: Optional[str] = "vanilla", window_size: Any = None) -> Optional[str]:
        """Why this configuration cannot compute a model's attention feature exactly, or None: the one rule the
        model build, Megatron-LM's ``validate_args`` and ``mindspeed-cp plan`` refuse by. Every algorithm computes
        sliding windows and sinks (``softmax_type`` off-by-one / learnable); a window replaces the attention mask
        in Megatron's attention, so it does not combine with an explicit one."""
        if self.cp == 1 or window_size is None or self.attention_mask_type != "general":
            return None
        return (
            f"sliding-window attention (window_size={window_size}) with --attention-mask-type general: a window "
            f"replaces the mask in Megatron's attention; use --attention-mask-type causal"
        )

    # ------------------------------------------------------------------ misc
    def replace(self, **changes: Any) -> "CPConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [f"CP={self.cp}", self.context_parallel_algo]
        if self.context_parallel_algo == HYBRID:
            parts.append(f"ulysses={self.ulysses_size} ring={self.ring_size}")
        if self.cp_window_size > 1:
            parts.append(f"window={self.cp_window_size}")
        for name in ("use_cp_send_recv_overlap", "megatron_cp_in_bnsd", "use_ulysses_allgather_kv"):
            if getattr(self, name):
                parts.append(name)
        if self.context_parallel_algo == HYBRID and self.hybrid_outer_cp_algo != RING:
            parts.append(f"outer={self.hybrid_outer_cp_algo}")
        if not self.cp_allgather_overlap:
            parts.append("no_cp_allgather_overlap")
        if self.window_attn_cp_algo and self.window_attn_cp_algo != self.context_parallel_algo:
            parts.append(f"window-layers={self.window_attn_cp_algo}")
        if self.context_parallel_kv_cache_policy:
            parts.append(
                f"kv_cache={self.context_parallel_kv_cache_policy}"
                + (f"/{self.context_parallel_cache_interval + 1}" if self.context_parallel_cache_interval else "")
            )
        parts.append(f"mask={self.attention_mask_type}")
        return " ".join(parts)


# ------------------------------------------------------- the flags (Megatron-LM's parser, mindspeed-cp check)
# (option, argparse keywords): MindSpeed's names, types, choices and defaults.
ARGUMENTS = (
    (
        "--context-parallel-size",
        dict(type=int, default=1, help="ranks sharing one sequence (Megatron's own flag; added only if absent)"),
    ),
    (
        "--context-parallel-algo",
        dict(
            type=str,
            default=ULYSSES,
            choices=ALGORITHMS,
            help="context-parallel algorithm: ulysses_cp_algo (default, all-to-all), "
            "megatron_cp_algo (ring attention), hybrid_cp_algo (Ulysses x ring), "
            "kvallgather_cp_algo (K/V all-gathered, dK/dV reduce-scattered)",
        ),
    ),
    (
        "--ulysses-degree-in-cp",
        dict(type=int, default=None, help="hybrid_cp_algo: ranks per Ulysses group; the ring gets CP / this"),
    ),
    (
        "--cp-window-size",
        dict(type=int, default=1, help="ring level: > 1 selects Double Ring with inner windows of this many ranks"),
    ),
    (
        "--use-cp-send-recv-overlap",
        dict(
            action="store_true",
            help="ring level: send and receive on two communicators (the exchanges overlap the blocks either way)",
        ),
    ),
    ("--megatron-cp-in-bnsd", dict(action="store_true", help="ring level: compute attention blocks in [b, n, s, d]")),
    (
        "--attention-mask-type",
        dict(
            type=str,
            default="causal",
            choices=MASK_TYPES,
            help="causal (default), or general: the explicit mask from the batch",
        ),
    ),
    (
        "--context-parallel-kv-cache-policy",
        dict(
            type=str,
            default=None,
            choices=KV_CACHE_POLICIES,
            help="keep K/V for backward instead of communicating them again: full (K and V) or half (K); default: none",
        ),
    ),
    (
        "--context-parallel-cache-interval",
        dict(
            type=int,
            default=0,
            help="the KV-cache policy applies to layers with layer_number %% (N+1) == 1 only (0: every layer)",
        ),
    ),
    (
        "--use-ulysses-allgather-kv",
        dict(action="store_true", help="ulysses_cp_algo with GQA: K/V by all-gather, Q by all-to-all"),
    ),
    (
        "--no-cp-allgather-overlap",
        dict(
            action="store_false",
            dest="cp_allgather_overlap",
            help="kvallgather_cp_algo: gather every KV head in one collective, waited for before any compute "
            "(default: the gather split by KV heads, each part overlapping the compute of the previous one)",
        ),
    ),
    (
        "--hybrid-outer-cp-algo",
        dict(
            type=str,
            default=RING,
            choices=(RING, KVALLGATHER),
            help="hybrid_cp_algo: the level over the ring group - megatron_cp_algo (ring / Double Ring, default) or "
            "kvallgather_cp_algo (the K/V all-gather on the KV heads each Ulysses rank holds)",
        ),
    ),
    (
        "--window-attn-cp-algo",
        dict(
            type=str,
            default=None,
            choices=ALGORITHMS,
            help="the CP algorithm of the sliding-window layers (--window-size); default: --context-parallel-algo. "
            "megatron_cp_algo: the window-aware ring, only the keys a window reaches travel",
        ),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the context-parallel flags the parser lacks (Megatron-LM already has
    ``--context-parallel-size``); usable as Megatron's ``extra_args_provider``. Returns the parser."""
    present = set(getattr(parser, "_option_string_actions", {}))
    missing = [(flag, kw) for flag, kw in ARGUMENTS if flag not in present]
    if missing:
        group = parser.add_argument_group("mindspeed-cp", "context parallelism (MindSpeed's flags)")
        for flag, kw in missing:
            group.add_argument(flag, **kw)
    return parser
