"""Running plain torch ops inside Lightning's ``configure_model``.

Lightning builds models under torch-function modes (the device context, empty init). Work done
there by a plugin's first-use preparation, such as a warm-start training loop, would pass every op
through those modes in Python, several times slower for a tiny model. Such loops run on the CPU,
like data preparation, whatever device the run uses.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def plain_torch() -> Iterator[None]:
    """Leave every active torch-function mode for the duration of the block (they are restored after)."""
    from torch._C import _len_torch_function_stack
    from torch.overrides import _pop_mode_temporarily

    with contextlib.ExitStack() as stack:
        while _len_torch_function_stack() > 0:
            stack.enter_context(_pop_mode_temporarily())
        yield
