"""The reproduction's numerics do not move (issue 21): the fp32 path without checkpointing or gradient
accumulation gives bit-identical losses and gradients (hence the same RNG order of the gate noise) to the
code the committed run records were trained with; see `repro_numerics`."""
from __future__ import annotations

import json

import pytest
import torch

from repro_numerics import FIXTURE, VARIANTS, run
from structlora.repro.methods.registry import pinned_library_defaults

pytestmark = pytest.mark.usefixtures("one_thread")
RECORDED = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_numerics_are_bit_identical_to_the_recorded_ones(variant):
    if RECORDED["torch"] != torch.__version__:
        pytest.skip(f"recorded with torch {RECORDED['torch']}, running {torch.__version__}")
    assert run(variant, pinned_library_defaults()) == RECORDED["steps"][variant]
