"""The arithmetic of a secure sum, free of any engine: what each client puts into the masked
vector, and how the server turns the unmasked sum back into the data-weighted mean.

Client k sends x_k = [(n_k / S) · v_k, n_k / S] (v_k the dense form of its upload, n_k its
example count, S a public scale: the largest client's training-set size). The sum's last entry
is Σ_k n_k / S, which the server also computes from the public partition; the mean is
Σ_k n_k v_k / Σ_k n_k, the plain aggregate's data-weighted (FedAvg) mean. SecAgg+ clips each entry to ±c and quantises it to Q levels, so
each summed entry is off by at most n · 2c/Q. Flower's protocol itself lives in
:mod:`lora_a2.engines.secagg`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def client_vector(strategy, task, update, clip: float, scale: float) -> np.ndarray:
    """x_k = [(n_k / S) · v_k, n_k / S] as float64, clipped to ±clip (the count logged): v_k
    is ``strategy.secure_vector(task, update)``, n_k ``update.num_examples`` and S = ``scale``,
    the public scale every node computes from the public partition itself."""
    w = update.num_examples / scale
    v = strategy.secure_vector(task, update).to(torch.float64) * w
    x = torch.cat([v, torch.tensor([w], dtype=torch.float64)]).numpy()
    over = int(np.sum(np.abs(x) > clip))
    if over:
        log.warning("client %d: %d entries outside ±secagg.clipping_range = %g were clipped",
                    task.client_id, over, clip)
        x = np.clip(x, -clip, clip)
    return x


def quantisation_tolerance(clients: int, clip: float, quantization_range: int) -> float:
    """How far the unmasked sum's weight entry may sit from the public Σ n_k/S: ``clients`` ·
    2c/Q (one quantisation step per client), doubled for the float arithmetic around it."""
    return 2 * clients * 2 * clip / quantization_range


def secure_mean(total: np.ndarray, public_weight: float, clients: int, clip: float,
                quantization_range: int) -> tuple[torch.Tensor | None, str | None]:
    """The data-weighted mean Σ_k n_k v_k / Σ_k n_k from the unmasked sum Σ_k x_k of
    ``clients`` vectors x_k = [(n_k/S) v_k, n_k/S]; (None, reason) when its last entry is not
    ``public_weight`` = Σ_k n_k/S, which the server computes from the public partition.

    Clipping bounds each entry of a client's vector, but not the sign of its weight entry: a
    client that sends minus the others' weights would drive the sum's weight to ≈ 0 and the
    mean to any size. The entry may differ from the public value only by the quantisation
    error, at most ``clients`` · 2c/Q (doubled here for the float arithmetic around it); the
    mean then divides by the public value, not the one the clients sent."""
    tolerance = quantisation_tolerance(clients, clip, quantization_range)
    got = float(total[-1])
    if not (public_weight > 0 and abs(got - public_weight) <= tolerance):
        return None, (f"the secure sum's weight entry is {got:.6g}, not the survivors' public "
                      f"Σ n_k/S = {public_weight:.6g} (± {tolerance:.2g}): a client sent a "
                      f"malformed vector")
    return torch.from_numpy(np.asarray(total[:-1], dtype=np.float64) / public_weight), None
