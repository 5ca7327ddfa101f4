"""Round trip with The Well's own reader: a dataset noa-data writes reads the same in both."""

from __future__ import annotations

import pytest
import torch
from the_well.data import WellDataset
from the_well.data.normalization import ZScoreNormalization

from noa_dist.data.dataset import WellWindowDataset
from noa_dist.data.generate import generate_dataset


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate_dataset(
        tmp_path_factory.mktemp("gen") / "ds",
        n_trajectories=6,
        grid=16,
        timesteps=6,
        trajectories_per_shard=2,
        split_fractions=(0.5, 0.25, 0.25),
        workers=1,
        progress=False,
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_generated_dataset_reads_the_same_in_the_well_and_in_our_reader(generated, normalize):
    T = 3
    ours = WellWindowDataset(generated, "train", T, window_stride=1, normalize=normalize)
    theirs = WellDataset(
        path=str(generated),
        well_split_name="train",
        n_steps_input=1,
        n_steps_output=T,
        use_normalization=normalize,
        normalization_type=ZScoreNormalization if normalize else None,
        return_grid=False,
        boundary_return_type=None,
    )
    assert len(ours) == len(theirs) == 3 * (7 - T)  # 3 train trajectories, starts 0..3
    assert ours.layout.predicted == ("u",)
    assert ours.layout.conditioning == (
        "forcing",
        "diffusivity",
        "advection_velocity_x",
        "advection_velocity_y",
    )
    for i in (0, 5, len(ours) - 1):
        mine, well = ours[i], theirs[i]
        torch.testing.assert_close(
            mine["u0"], well["input_fields"][0].permute(2, 0, 1), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            mine["target"], well["output_fields"].permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            mine["cond"], well["constant_fields"].permute(2, 0, 1), rtol=1e-5, atol=1e-5
        )
