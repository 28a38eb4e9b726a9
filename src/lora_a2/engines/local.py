"""The embedded engine: one process simulates every client on one model, loaded once.

It is a transport under the one round loop (:mod:`lora_a2.rounds`): each sampled client's task
is encoded to bytes, decoded on the "client side" of this process, trained with
``strategy.upload``, and the upload encoded again — so the byte counts are those a network would
carry, and the server side reads only those bytes.
"""

from __future__ import annotations

from typing import Any

from ..experiment import Experiment
from ..fedbuff import run_async_round as run_async_round_over
from ..payload import decode, encode
from ..rounds import (OnClient, Reply, Transport, drops_out, eval_reply, evaluate_state,
                      read_eval_reply, round_record, run_round as run_round_over,
                      sample_clients)
from ..messages import ServerState, Task

__all__ = ["LocalTransport", "drops_out", "eval_reply", "evaluate_state", "read_eval_reply",
           "round_record", "run_async_round", "run_round", "sample_clients"]


class LocalTransport(Transport):
    """Every client runs in this process on the one shared model; only the encoded bytes
    cross between the server and the client side."""

    def exchange(self, exp: Experiment, rnd: int, tasks: dict[int, bytes],
                 on_client: OnClient) -> dict[int, Reply]:
        layout = exp.runtime.layout
        replies: dict[int, Reply] = {}
        for c, down in tasks.items():
            # ---- client side: only the bytes cross over ---------------------------------
            ctx = exp.client_context(c)
            client_task = Task.from_payload(decode(down), layout)
            replies[c] = Reply(encode(exp.strategy.upload(ctx, client_task).to_payload()))
            if on_client is not None:
                on_client(c)
        return replies

    def exchange_eval(self, exp: Experiment, rnd: int, tasks: dict[int, bytes]
                      ) -> dict[int, Reply]:
        layout = exp.runtime.layout
        out: dict[int, Reply] = {}
        for c, down in tasks.items():
            task = Task.from_payload(decode(down), layout)
            out[c] = Reply(encode(eval_reply(
                c, exp.strategy.client_evaluate(exp.client_context(c), task))))
        return out


_TRANSPORT = LocalTransport()


def run_round(exp: Experiment, rnd: int, state: ServerState, on_client: OnClient = None
              ) -> tuple[ServerState, dict[str, Any]]:
    """One round of :func:`lora_a2.rounds.run_round` over the in-process transport."""
    return run_round_over(exp, rnd, state, _TRANSPORT, on_client)


def run_async_round(exp: Experiment, rnd: int, state: ServerState, on_client: OnClient = None
                    ) -> tuple[ServerState, dict[str, Any]]:
    """One round (one aggregation) of the asynchronous schedule, :func:`lora_a2.fedbuff.
    run_async_round`, over the in-process transport."""
    return run_async_round_over(exp, rnd, state, _TRANSPORT, on_client)
