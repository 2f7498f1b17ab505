"""The ClientApp's data on a deployed device: the agent's sample store, nothing else.

The agent passes its store to its SuperNode (node-config ``sample-store``, and
``sample-key`` when the store is encrypted; ``min-samples`` from ``[data]``). The split
is :func:`edgefleet.device.data.store.held_out` by sample id: deterministic, the same
in every round and for ``edgefleet-agent data eval``, and a sample never changes side as
the store grows. Too few samples (or none held out) raise :class:`TooFewSamples`, which
the ClientApp turns into a decline with its own code
(:data:`~edgefleet.device.wire.federated.DECLINED_FEW_SAMPLES`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import ConfigError, EdgefleetError
from edgefleet.device.data.store import SampleStore, held_out, load_key

__all__ = ["TooFewSamples", "store_split", "store_split_ids"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class TooFewSamples(EdgefleetError):
    """The store holds fewer samples than the node's ``min-samples``."""


def store_split(path: str, key_path: str, min_samples: int,
                seed: int = 0) -> tuple[F32, I64, F32, I64]:
    """(x_train, y_train, x_test, y_test) from the sample store at ``path``."""
    split = store_split_ids(path, key_path, min_samples, seed)
    return split[1], split[2], split[4], split[5]


def store_split_ids(path: str, key_path: str, min_samples: int, seed: int = 0
                    ) -> tuple[I64, F32, I64, I64, F32, I64]:
    """(ids_train, x_train, y_train, ids_test, x_test, y_test): with the sample ids, which
    key the embedding cache (:mod:`edgefleet.device.data.embeddings`)."""
    store_file = Path(path).expanduser()
    if not store_file.is_file():
        raise TooFewSamples(f"no samples: the sample store {store_file} does not exist")
    key = load_key(Path(key_path).expanduser()) if key_path else None
    try:
        with SampleStore(store_file, key=key) as st:
            got = st.samples()
    except EdgefleetError:
        raise
    except Exception as exc:  # sqlite3.Error: unreadable store
        raise ConfigError(f"cannot read the sample store: {exc}", path=str(store_file)) \
            from None
    if len(got.y) < min_samples:
        raise TooFewSamples(f"few samples: {len(got.y)} stored, min-samples is {min_samples}")
    x_train, y_train, x_test, y_test = got.split(seed)
    if len(y_test) == 0 or len(y_train) == 0:
        raise TooFewSamples(f"few samples: {len(y_train)} to train on, {len(y_test)} "
                            "held out")
    test = held_out(got.ids, seed)
    return got.ids[~test], x_train, y_train, got.ids[test], x_test, y_test
