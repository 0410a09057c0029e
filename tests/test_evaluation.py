"""The held-out perplexity protocol: non-overlapping windows, or strided ones scoring each token once."""

from __future__ import annotations

import math

import pytest
import torch

from evop.config import ConfigError, build_config
from evop.eval.perplexity import (
    StridedWindows,
    heldout_set,
    perplexities,
    strided_perplexity,
    strided_windows,
    text_blocks,
)
from evop.method.fitness import perplexity
from tests.tiny_models import tiny_model, tiny_tokenizer, write_docs


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return str(write_docs(tmp_path_factory.mktemp("text") / "docs.jsonl"))


def test_stride_equal_to_the_window_is_the_non_overlapping_protocol(docs):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    blocks = text_blocks(docs, tokenizer, 32, 6)
    strided = strided_windows(docs, tokenizer, 32, 32, 6)
    assert torch.equal(strided.windows, blocks) and strided.score_from.tolist() == [0] * 6
    assert strided_perplexity(model, strided, 4) == pytest.approx(perplexity(model, blocks, 4), rel=1e-6)
    assert isinstance(heldout_set(docs, tokenizer, 32, 6, stride=None), torch.Tensor)


def test_strided_windows_score_every_token_once_with_context(docs):
    tokenizer = tiny_tokenizer()
    data = strided_windows(docs, tokenizer, 32, 8, 10)
    assert data.windows.shape == (10, 32)
    assert data.score_from.tolist() == [0] + [24] * 9
    stream = text_blocks(docs, tokenizer, 1, None).flatten()
    for i, window in enumerate(data.windows):
        assert torch.equal(window, stream[i * 8 : i * 8 + 32])  # window i starts i * stride tokens in
    # Targets scored: 31 in the first window, then the 8 new tokens of each later one.
    assert 31 + 9 * 8 == sum(32 - max(1, int(f)) for f in data.score_from)


def test_strided_perplexity_matches_a_direct_computation(docs):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    data = heldout_set(docs, tokenizer, 32, 5, stride=16)
    assert isinstance(data, StridedWindows)
    total, count = 0.0, 0
    with torch.no_grad():
        for window, first in zip(data.windows, data.score_from, strict=True):
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].float(), -1)
            for j in range(max(1, int(first)), 32):
                total -= logp[j - 1, window[j]].item()
                count += 1
    assert strided_perplexity(model, data, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-5)
    assert perplexities(model, {"strided": data}, 2)["strided"] == strided_perplexity(model, data, 2)


def test_bad_strides_are_refused(docs):
    with pytest.raises(ValueError, match="stride must be in"):
        strided_windows(docs, tiny_tokenizer(), 32, 40)
    with pytest.raises(ConfigError, match="stride"):
        build_config({"evaluation": {"block_len": 64, "stride": 65}})
