"""transformers-layout Moshi: loading and generate() token for token against transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moshi_mlx.errors import InputError
from moshi_mlx.models.moshi import MoshiForCausalLM, MoshiForConditionalGeneration
import reference as R

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = R.random_transformers_moshi()
    path = tmp_path_factory.mktemp("hf-moshi")
    ref.save_pretrained(path)
    return ref, MoshiForConditionalGeneration.from_pretrained(path)


def test_unconditional_greedy_generate_matches(tiny):
    ref, ours = tiny
    with torch.no_grad():
        want = ref.generate(max_new_tokens=24, do_sample=False, depth_decoder_do_sample=False,
                            return_audio_codes=True, return_audio_waveforms=True)
    got = ours.generate(max_new_tokens=24, do_sample=False, depth_decoder_do_sample=False)
    np.testing.assert_array_equal(np.array(got.sequences), want.sequences.numpy())
    np.testing.assert_array_equal(np.array(got.audio_codes), want.audio_codes.numpy())
    assert len(np.unique(want.sequences.numpy())) > 5  # not a degenerate repetition
    a, b = np.array(got.audio_sequences), want.audio_sequences.numpy()
    assert a.shape == b.shape
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-7


def test_prompted_greedy_generate_matches(tiny):
    ref, ours = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 4), generator=g)
    user = torch.randint(0, 2048, (2, 8, 4), generator=g)
    moshi = torch.randint(0, 2048, (2, 8, 4), generator=g)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, user_audio_codes=user, moshi_audio_codes=moshi, max_new_tokens=12,
                            do_sample=False, depth_decoder_do_sample=False, return_audio_codes=True,
                            return_audio_waveforms=False)
    got = ours.generate(input_ids=ids.numpy(), user_audio_codes=user.numpy(), moshi_audio_codes=moshi.numpy(),
                        max_new_tokens=12, do_sample=False, depth_decoder_do_sample=False,
                        return_audio_waveforms=False)
    np.testing.assert_array_equal(np.array(got.sequences), want.sequences.numpy())
    np.testing.assert_array_equal(np.array(got.audio_codes), want.audio_codes.numpy())


def test_unconditional_inputs_and_alignment_errors(tiny):
    _, ours = tiny
    unc = ours.get_unconditional_inputs(2)
    assert np.array(unc["input_ids"]).tolist() == [[100], [100]]
    assert np.array(unc["moshi_audio_codes"]).shape == (2, 8, 1) and int(unc["moshi_audio_codes"][0, 0, 0]) == 2048
    with pytest.raises(InputError, match="time-aligned"):
        ours.generate(input_ids=np.zeros((1, 3), int), user_audio_codes=np.zeros((1, 8, 2), int),
                      moshi_audio_codes=np.zeros((1, 8, 3), int), max_new_tokens=2)
    with pytest.raises(InputError, match="given together"):
        ours.generate(input_ids=np.zeros((1, 3), int), max_new_tokens=2)
    with pytest.raises(InputError, match=r"\[batch, 8, frames\]"):
        ours.generate(input_ids=np.zeros((1, 3), int), user_audio_codes=np.zeros((1, 7, 3), int),
                      moshi_audio_codes=np.zeros((1, 8, 3), int), max_new_tokens=2)


def test_causal_lm_greedy_matches(tmp_path):
    ref = R.random_transformers_causal_lm()
    ref.save_pretrained(tmp_path)
    ours = MoshiForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        want = ref.generate(input_ids=ids, max_new_tokens=30, do_sample=False)
    got = ours.generate(ids.numpy(), max_new_tokens=30, do_sample=False)
    np.testing.assert_array_equal(np.array(got), want.numpy())


@pytest.mark.parametrize("concat", [True, False])
def test_audio_codes_are_transformers_frames(tiny, concat):
    """`audio_codes` has transformers' shape and values with and without the initial frame
    (concat_unconditional_inputs): no column of initial tokens (`card`, not a Mimi code), so
    it decodes as is. With concat False, a prompt whose first frame is the initial frame
    (get_unconditional_inputs) drops that frame too."""
    ref, ours = tiny
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (1, 3), generator=g)
    user = torch.randint(0, 2048, (1, 8, 3), generator=g)
    moshi = torch.randint(0, 2048, (1, 8, 3), generator=g)
    if not concat:
        unc = ours.get_unconditional_inputs(1)
        ids = torch.cat([torch.from_numpy(np.array(unc["input_ids"])).long(), ids], 1)
        user = torch.cat([torch.from_numpy(np.array(unc["user_audio_codes"])).long(), user], 2)
        moshi = torch.cat([torch.from_numpy(np.array(unc["moshi_audio_codes"])).long(), moshi], 2)
    kw = dict(max_new_tokens=6, do_sample=False, depth_decoder_do_sample=False, concat_unconditional_inputs=concat)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, user_audio_codes=user, moshi_audio_codes=moshi, return_audio_codes=True,
                            return_audio_waveforms=False, **kw).audio_codes.numpy()
    got = np.array(ours.generate(input_ids=ids.numpy(), user_audio_codes=user.numpy(),
                                 moshi_audio_codes=moshi.numpy(), return_audio_waveforms=False, **kw).audio_codes)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want)
    assert got.max() < 2048  # Mimi codes only: decodable
