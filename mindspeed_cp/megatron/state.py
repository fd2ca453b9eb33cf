"""The runtime CP state: the active :class:`CPConfig` and this rank's context-parallel groups.

There is exactly one :data:`STATE`. ``configure()`` sets its config; the patched
``parallel_state.initialize_model_parallel`` fills its groups from :func:`topology.layout_for` right
after Megatron's own groups; ``destroy_model_parallel`` clears them. Algorithms never read this object:
they take their process groups as arguments (the Megatron glue looks them up here), so two models with
different groups never share hidden state.

Group kinds (see :mod:`mindspeed_cp.topology`): ``ulysses``, ``ring``, ``ring_intra_window``,
``ring_inter_window``. Under ``--use-cp-send-recv-overlap`` each ring kind has a second communicator,
:meth:`CPState.overlap_group`, so a send and a receive posted together do not serialise.
:attr:`CPState.agree_group` is where every attention call agrees on its inputs (:mod:`mindspeed_cp.agreement`):
the CP group itself when the default backend is gloo, else a gloo twin over the same ranks (as Megatron
keeps for data parallelism), so the agreement never synchronises the device.

Timeouts: every communicator created here gets ``timeout_minutes`` (``configure(
distributed_timeout_minutes=...)``, else Megatron's ``--distributed-timeout-minutes`` as given to
``initialize_model_parallel``), the same as Megatron's own CP group, so a stalled peer ends a collective
with an error after that time on every rank instead of hanging it.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from ..config import CPConfig
from ..options import DoubleRingWindow
from ..topology import CP_KINDS, RING_KINDS, layout_for


class CPStateError(RuntimeError):
    pass


class CPState:
    def __init__(self) -> None:
        self.config: CPConfig = CPConfig()
        self.configured: bool = False  # configure() was called
        self.cp_explicit: bool = False  # configure() named context_parallel_size
        self._groups: Dict[str, object] = {}
        self._overlap: Dict[str, object] = {}
        self._ranks: Dict[str, List[int]] = {}
        self._created: List[object] = []  # communicators created here (not Megatron's CP group)
        self.layout: Optional[Dict[str, List[List[int]]]] = None
        # Global sequence length of the batch last split by get_batch_on_this_cp_rank. Ulysses in Megatron
        # takes its gather size (and RoPE its positions) from it when lengths are unaligned; the Ulysses
        # all-to-all re-checks it against every rank's local length, so a stale value is an error, not a
        # wrong result.
        self.seq_len: Optional[int] = None
        self.warned_unsplit: bool = False
        self.timeout_minutes: Optional[float] = None  # configure(distributed_timeout_minutes=...)
        # Packed documents (mindspeed_cp.layout.packing): where get_batch_on_this_cp_rank reads the boundaries
        # ("position_ids": restarts at 0, "eod": after every eod_token), and the Documents of the last batch,
        # which every attention layer of the step uses; ``packed``: the PackedSeqParams get_thd_batch_on_this_cp_rank
        # returned for that batch (a THD batch), which core attention and RoPE then expect.
        self.documents_from: Optional[str] = None
        self.eod_token: Optional[int] = None
        self.documents = None
        self.packed = None
        self._agree = None

    # ------------------------------------------------------------ config
    def set_config(self, config: CPConfig) -> None:
        """Make ``config`` active (``configure()`` refuses a change while groups exist)."""
        self.config = config
        self.configured = True

    def reset(self) -> None:
        self.__init__()

    # ------------------------------------------------------------ groups
    @property
    def groups_built(self) -> bool:
        return self.layout is not None

    def build_groups(
        self,
        world_size: int,
        rank: int,
        tp: int,
        pp: int,
        new_group: Callable[[List[int]], object],
        cp_group: object,
        gloo_group: Optional[Callable[[List[int]], object]] = None,
    ) -> None:
        """Create the CP sub-groups on every rank, in the same order everywhere (a collective).

        Kinds equal to the CP group itself reuse Megatron's ``cp_group`` instead of a new communicator.
        ``gloo_group`` (given when the default backend is not gloo) builds the CPU twins of the CP groups
        that :attr:`agree_group` returns.
        """
        layout = layout_for(self.config, world_size, tp, pp)
        self._groups, self._overlap, self._ranks = {}, {}, {}
        for kind in CP_KINDS:
            if kind not in layout:
                continue
            same_as_cp = layout[kind] == layout["cp"]
            for ranks in layout[kind]:
                pg = cp_group if same_as_cp else None
                if not same_as_cp:
                    pg = new_group(ranks)
                    self._created.append(pg)
                if rank in ranks:
                    self._groups[kind] = pg
                    self._ranks[kind] = list(ranks)
            if kind in RING_KINDS and self.config.use_cp_send_recv_overlap:
                for ranks in layout[kind]:
                    pg = new_group(ranks)
                    self._created.append(pg)
                    if rank in ranks:
                        self._overlap[kind] = pg
        self._agree = cp_group
        if gloo_group is not None:
            for ranks in layout["cp"]:
                pg = gloo_group(ranks)
                self._created.append(pg)
                if rank in ranks:
                    self._agree = pg
        self.layout = layout

    def clear_groups(self, destroy: Optional[Callable[[object], None]] = None) -> None:
        """Forget the groups; ``destroy`` is called on every communicator this state created."""
        if destroy is not None:
            for pg in self._created:
                destroy(pg)
        self._created = []
        self._groups, self._overlap, self._ranks = {}, {}, {}
        self._agree = None
        self.layout = None
        self.seq_len = None
        self.documents = None
        self.packed = None

    @property
    def agree_group(self):
        """The group (gloo: CPU metadata) over this rank's CP ranks where attention calls agree on inputs."""
        if not self.groups_built:
            self._need("cp", {})
        return self._agree

    def _need(self, kind: str, table: Dict[str, object]):
        if not self.groups_built:
            raise CPStateError(
                "context-parallel groups are not initialized: call mindspeed_cp.megatron_adaptor.configure(...) "
                "and then megatron.core.parallel_state.initialize_model_parallel(...)"
            )
        if kind not in table:
            raise CPStateError(
                f"no {kind!r} group for {self.config.describe()} (available: {', '.join(sorted(table)) or 'none'})"
            )
        return table[kind]

    def group(self, kind: str):
        """This rank's process group of ``kind`` (``ulysses``, ``ring``, ``ring_intra_window``, ...)."""
        return self._need(kind, self._groups)

    def overlap_group(self, kind: str):
        """The second communicator of a ring kind (only with ``use_cp_send_recv_overlap``)."""
        return self._need(kind, self._overlap)

    def ranks(self, kind: str) -> List[int]:
        """Global ranks of this rank's group of ``kind``, in group order."""
        return list(self._need(kind, self._ranks))

    def has(self, kind: str) -> bool:
        return kind in self._groups

    def double_ring_window(self) -> Optional[DoubleRingWindow]:
        """This rank's Double Ring groups (None for a single ring)."""
        if not self.config.is_double_ring:
            return None
        overlap = self.config.use_cp_send_recv_overlap
        return DoubleRingWindow(
            size=self.config.cp_window_size,
            intra_group=self.group("ring_intra_window"),
            inter_group=self.group("ring_inter_window"),
            intra_overlap_group=self.overlap_group("ring_intra_window") if overlap else None,
            inter_overlap_group=self.overlap_group("ring_inter_window") if overlap else None,
        )


STATE = CPState()
